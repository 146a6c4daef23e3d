"""Configuration of the instance stage (pydantic models only)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from pipeline.config.cluster import ClusterJob

LABEL_DTYPES = ("uint64", "uint32")
MeshFormat = Literal["sharded", "legacy"]


class DecodeConfig(BaseModel):
    """How a probability block becomes labelled objects (defaults of Li et al., EMBC 2021)."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["auto", "watershed", "components"] = Field(
        "auto",
        description="'watershed' needs mask + contour channels, 'components' uses the mask only; "
        "'auto' picks watershed for 2 channels and components for 1.",
    )
    threshold: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Components: foreground = mask probability > threshold; None = the input's recorded "
        "threshold, else 0.5.",
    )
    seed_threshold: float = Field(
        0.85,
        ge=0,
        le=1,
        description="t1: seeds need mask probability > t1. Watershed floods from seeds; components keep only "
        "objects that hold a seed voxel somewhere (hysteresis), which drops faint blobs; 0 keeps every component.",
    )
    contour_threshold: float = Field(0.6, ge=0, le=1, description="Watershed t2: seeds need contour probability < t2.")
    foreground_threshold: float = Field(
        0.8, ge=0, le=1, description="Watershed t3: foreground = mask probability > t3 (seeds lie inside it)."
    )
    min_size: int = Field(128, ge=0, description="Objects smaller than this many voxels (whole object) are removed.")
    connectivity: Literal[6, 18, 26] = Field(
        6, description="Voxel neighbourhood for components, seeds and watershed flooding (6, 18 or 26)."
    )


class InstancesConfig(ClusterJob):
    """One instance-segmentation job: probabilities in, a label volume and a table of objects out."""

    model_config = ConfigDict(extra="forbid")

    input: str | None = Field(None, description="URL or path of the probability volume written by `segment`.")
    output: str | None = Field(None, description="URL or path of the label volume to write (zarr or precomputed).")
    table: str | None = Field(
        None, description="Path of the per-object table to write: .parquet or .csv; None = no table."
    )
    block_size: tuple[int, int, int] | None = Field(
        None,
        description="Block (z, y, x) in voxels, a multiple of the input's chunks; None = the chunk multiple "
        "nearest 64x256x256.",
    )
    shard_size: tuple[int, int, int] | None = Field(
        None,
        description="Label shard (z, y, x) in voxels, whole chunks of the input, for new outputs: one file per shard "
        "(zarr v3 sharding, precomputed sharded; its pyramid levels too) instead of one per chunk; blocks must be "
        "whole shards (block_size None: the shard multiple nearest 64x256x256). None = unsharded.",
    )
    roi: str | None = Field(None, description="Region OFFSET:SHAPE in voxels (z,y,x each); None = whole volume.")
    dtype: str = Field("uint64", description="Label type of the output: 'uint64' or 'uint32'.")
    resume: bool = Field(True, description="Skip blocks recorded as done by an earlier run of the same job.")
    viewing: bool = Field(True, description="Add pyramid levels, meshes and segment properties for Neuroglancer.")
    mesh_format: MeshFormat = Field(
        "sharded",
        description="Meshes as a few shard files of multi-resolution meshes (Neuroglancer loads any object with a "
        "few range requests), or 'legacy': one file per object per block, fine for thousands of objects only.",
    )
    keep_scratch: bool = Field(False, description="Keep the provisional labels and per-block files after success.")
    decode: DecodeConfig = Field(default_factory=DecodeConfig, description="Decoding thresholds and method.")

    @field_validator("dtype")
    @classmethod
    def _label_dtype(cls, value: str) -> str:
        if value not in LABEL_DTYPES:
            raise ValueError(
                f"labels need an unsigned integer type, one of {', '.join(LABEL_DTYPES)}; {value!r} cannot hold "
                "instance IDs exactly"
            )
        return value

    @field_validator("table")
    @classmethod
    def _table_format(cls, value: str | None) -> str | None:
        if value is not None and not value.lower().endswith((".parquet", ".csv")):
            raise ValueError(f"table {value!r} must end in .parquet or .csv (the format is taken from the suffix)")
        return value

    @field_validator("block_size", "shard_size")
    @classmethod
    def _positive_size(cls, value: tuple[int, int, int] | None, info: ValidationInfo) -> tuple[int, int, int] | None:
        if value is not None and any(v <= 0 for v in value):
            raise ValueError(f"{info.field_name} must be three positive voxel counts (z, y, x), got {list(value)}")
        return value

    @model_validator(mode="after")
    def _distinct_paths(self) -> InstancesConfig:
        if self.input is not None and self.input == self.output:
            raise ValueError("output must differ from input: the labels would overwrite the probabilities")
        return self
