"""Configuration of `mitoseg segment` (pydantic models only)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import ConfigDict, Field, field_validator

from pipeline.config.cluster import ClusterJob
from pipeline.config.instances import InstancesConfig
from pipeline.config.synthetic import SyntheticVolume
from pipeline.geometry import Vec3
from pipeline.network.inputs import VOXEL_SIZE_TOLERANCE
from pipeline.network.tta import TTAMode

Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]


class SegmentConfig(ClusterJob):
    """A blockwise segmentation job: which volume, which network, how to split and run it."""

    model_config = ConfigDict(extra="forbid")

    input: str = Field(description="EM volume URL: zarr://…, precomputed://…, or a local path.")
    output: list[str] = Field(
        min_length=1, description="Output volume URL(s); every block is written to each (e.g. zarr and precomputed)."
    )
    checkpoint: str | Path = Field(
        "lucchi",
        description="Trained network: a shipped checkpoint's name (lucchi, demo; see `mitoseg checkpoint info`) or "
        "the path to a checkpoint file (.pt).",
    )
    input_scale: int = Field(
        0, ge=0, description="Scale level to read (OME-Zarr multiscale level or precomputed mip); outputs get its grid."
    )
    fill_missing: bool = Field(
        False,
        description="Read input chunks absent from storage as the fill value (zeros) instead of failing the block; "
        "zarr leaves out chunks that hold only the fill value.",
    )
    input_range: tuple[float, float] | None = Field(
        None,
        description="Input intensities (low, high) mapped to [0, 1], e.g. [0, 255] for float input holding 8-bit "
        "values; none: integers by their type's maximum, floats must already lie in [0, 1].",
    )
    voxel_size_tolerance: float = Field(
        VOXEL_SIZE_TOLERANCE,
        ge=0.0,
        description="Largest relative difference per axis between the input's voxel size (nm) and the one the "
        "checkpoint was trained at before the job is refused (0.25 = 25 %).",
    )
    roi: str | None = Field(None, description="Region OFFSET:SHAPE in z,y,x voxels; the whole volume when absent.")
    block_size: Vec3 = Field(
        (64, 1024, 1024),
        description="Write block (z, y, x) in voxels; whole output chunks. Patches that straddle a block border are "
        "predicted by each block they meet, so large blocks compute less twice.",
    )
    chunk_size: Vec3 = Field((32, 128, 128), description="Output chunk (z, y, x) in voxels, for new outputs.")
    shard_size: Vec3 | None = Field(
        None,
        description="Output shard (z, y, x) in voxels, whole chunks, for new outputs: one file per shard (zarr v3 "
        "sharding, precomputed sharded) instead of one per chunk; blocks must be whole shards. None = unsharded.",
    )
    patch_shape: Vec3 | None = Field(None, description="Network input patch (z, y, x); the checkpoint's when absent.")
    margin: Vec3 | None = Field(
        None,
        description="Voxels (z, y, x) cut from each side of every patch's prediction before blending: at least the "
        "network's context, plus half the median size to cut the filter's edge. None = the checkpoint's.",
    )
    overlap: tuple[Fraction, Fraction, Fraction] | None = Field(
        None,
        description="Fraction by which neighbouring output tiles overlap: one for every axis, or (z, y, x). 0 computes "
        "each voxel once; a denser z stride (e.g. [0.75, 0.25, 0.25]) averages each voxel over tiles at several "
        "depths at several times the cost. None = the checkpoint's recommendation (0.25 if it records none).",
    )
    blending: Literal["gaussian", "bump", "constant"] = Field("gaussian", description="Weights across a tile.")
    tta: TTAMode = Field(
        "none", description="Test-time augmentation: yx averages 8 in-plane flips/swaps, zyx 16; as many passes."
    )
    median_size: int | None = Field(
        None,
        ge=0,
        description="Median-filter the mitochondrion probabilities of each tile over a cube of this many voxels "
        "(odd; 0 = off) before blending: smoother boundaries, less speckle; a function of the tile alone, so the "
        "result does not depend on the block size. None = the checkpoint's recommendation (none unless the "
        "checkpoint records one).",
    )
    output_dtype: Literal["uint8", "float16", "float32"] = Field(
        "uint8", description="uint8 stores probability x 255; float16/float32 store the probability."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where workers run the network.")
    precision: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto",
        description="auto = float16 autocast on a GPU; bfloat16 autocast on a CPU with AMX units (about 1.75x the "
        "speed of float32, same Jaccard), float32 on other CPUs (bfloat16 is emulated there and slow).",
    )
    batch_size: int | None = Field(
        None,
        ge=1,
        description="Patches per network call on a worker (a block's last batch is padded to full size, so results "
        "do not depend on the block): more keep a GPU busy, at that many patches' memory. None = 1 on CPU, 4 on a GPU.",
    )
    gpu_resource: bool = Field(False, description="Ask Dask for one 'GPU' worker resource per block.")
    resume: bool = Field(
        True,
        description="Skip blocks whose record shows the same job and the same input region as now; False recomputes "
        "every block into the existing outputs (nothing is deleted).",
    )
    overwrite: bool = Field(
        False,
        description="Delete existing outputs (their data and done-records) and create them anew; without it "
        "mitoseg never deletes anything.",
    )
    retries: int = Field(2, ge=0, description="Times a failing block is retried before it is reported.")
    max_in_flight: int | None = Field(None, ge=1, description="Blocks submitted at once; 2 per worker + 2 if unset.")
    pyramid: bool = Field(True, description="Add down-sampled scales to the outputs for viewing.")
    instances: InstancesConfig | None = Field(
        None,
        description="Decode instances right after segment; its input defaults to the first output, its roi to "
        "this roi.",
    )
    synthetic: SyntheticVolume | None = Field(
        None, description="Generate a synthetic input (and truth) here when the input does not exist."
    )

    @field_validator("instances")
    @classmethod
    def _one_cluster(cls, value: InstancesConfig | None) -> InstancesConfig | None:
        if value is not None and "cluster" in value.model_fields_set:
            raise ValueError("the instances section runs on segment's own cluster: set cluster at the top of the job")
        return value

    @field_validator("input_range")
    @classmethod
    def _increasing(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not -float("inf") < value[0] < value[1] < float("inf"):
            raise ValueError(f"input_range is (low, high) with low < high, both finite; got {list(value)}")
        return value

    @field_validator("output", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("overlap", mode="before")
    @classmethod
    def _every_axis(cls, value: object) -> object:
        return (value,) * 3 if isinstance(value, int | float) else value

    @field_validator("median_size")
    @classmethod
    def _odd(cls, value: int | None) -> int | None:
        if value and value % 2 == 0:
            raise ValueError(f"a median filter needs an odd size (a centre voxel), got {value}; use {value + 1}")
        return value

    @field_validator("block_size", "chunk_size")
    @classmethod
    def _positive(cls, value: Vec3) -> Vec3:
        if any(v <= 0 for v in value):
            raise ValueError(f"every size must be > 0, got {value}")
        return value
