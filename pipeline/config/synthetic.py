"""Configuration of a synthetic EM-like volume (pydantic models only), for the demo's input and for training."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from pipeline.geometry import Vec3


class SyntheticVolume(BaseModel):
    """A synthetic EM-like volume (`pipeline.synthetic`) generated where a job expects a volume that is absent."""

    model_config = ConfigDict(extra="forbid")

    shape: Vec3 = Field((64, 256, 256), description="Volume shape (z, y, x) in voxels.")
    seed: int = Field(0, description="Random seed; the same seed gives the same volume, another seed another one.")
    voxel_size_nm: tuple[float, float, float] = Field((5.0, 5.0, 5.0), description="Voxel size (z, y, x) in nm.")
    truth: str | None = Field(
        None,
        description="segment only: where to write the ground-truth labels (volume URL); a training volume's labels "
        "go to its `label`.",
    )
