"""Configuration of a synthetic EM-like volume (pydantic models only), for the demo's input and for training."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.geometry import Vec3


class SyntheticVolume(BaseModel):
    """A synthetic EM-like volume (`pipeline.synthetic`) generated where a job expects a volume that is absent."""

    model_config = ConfigDict(extra="forbid")

    shape: Vec3 = Field((64, 256, 256), description="Volume shape (z, y, x) in voxels.")
    seed: int = Field(0, description="Random seed; the same seed gives the same volume, another seed another one.")
    voxel_size_nm: tuple[float, float, float] = Field((5.0, 5.0, 5.0), description="Voxel size (z, y, x) in nm.")
    drawn_voxel_size_nm: tuple[float, float, float] | None = Field(
        None,
        description="Voxel size (z, y, x) in nm at which the tissue is drawn before it is resampled to voxel_size_nm "
        "(objects then appear at another scale, as in data imaged at another voxel size); None = drawn at "
        "voxel_size_nm directly (the demo volumes).",
    )
    labelled_slices: list[int] | None = Field(
        None,
        description="training only: z-slices (voxels) whose labels are written; every other voxel of the label "
        "volume gets the volume's ignore_label (sparse annotation). None = all labelled.",
    )
    truth: str | None = Field(
        None,
        description="segment only: where to write the ground-truth labels (volume URL); a training volume's labels "
        "go to its `label`.",
    )

    @model_validator(mode="after")
    def _sparse_labels_train(self) -> SyntheticVolume:
        if self.labelled_slices is not None:
            if self.truth is not None:
                raise ValueError("labelled_slices is for training volumes; a segment job's truth is labelled fully")
            bad = [z for z in self.labelled_slices if not 0 <= z < self.shape[0]]
            if bad:
                raise ValueError(f"labelled_slices {bad} are outside z range [0, {self.shape[0]})")
        return self
