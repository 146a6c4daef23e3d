"""Configuration of the segmentation network (pydantic models only)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class NetworkConfig(BaseModel):
    """An anisotropic residual 3D U-Net in the style of Res-UNet-R (Li et al., EMBC 2021)."""

    model_config = ConfigDict(extra="forbid")

    architecture: Literal["resunet"] = Field("resunet", description="Network family; only 'resunet' exists.")
    in_channels: int = Field(1, ge=1, description="Input channels (1 for grey-level EM).")
    out_channels: Literal[1, 2] = Field(
        1, description="Output heads: 1 = mask only, 2 = mask (channel 0) and instance contour (channel 1)."
    )
    widths: list[int] = Field(
        [28, 36, 48, 64, 80], min_length=2, description="Feature channels per resolution level, top first."
    )
    downsample: list[tuple[int, int, int]] | None = Field(
        None,
        description="Down-sampling factor (z, y, x) between consecutive levels; default (1, 2, 2) everywhere.",
    )
    mode: Literal["3d", "2d"] = Field(
        "3d", description="'2d' uses 1x3x3 kernels everywhere (a per-slice network with 3D tensors)."
    )
    kernel_z: list[int] | None = Field(
        None, description="z size (1 or 3) of the residual-block kernels per level; default 3 (1 in '2d' mode)."
    )
    norm: Literal["batch", "group", "instance"] = Field(
        "batch", description="Normalisation layer; 'group' suits very small batches."
    )
    embedding_dim: int = Field(128, ge=2, description="Channels of the projection head (training only).")
    projection_head: bool = Field(True, description="Build the projection head used by the contrastive loss.")
    input_mean: float = Field(0.5, description="Mean subtracted from inputs scaled to [0, 1].")
    input_std: float = Field(0.25, gt=0, description="Std that inputs scaled to [0, 1] are divided by.")
    context: tuple[int, int, int] = Field(
        (2, 16, 16), description="Margin in voxels (z, y, x) per side that inference crops from a patch."
    )

    @model_validator(mode="after")
    def _check_levels(self) -> NetworkConfig:
        if self.downsample is not None and len(self.downsample) != len(self.widths) - 1:
            raise ValueError(
                f"downsample has {len(self.downsample)} entries but widths has {len(self.widths)} levels: "
                f"give exactly {len(self.widths) - 1} factors (one between each pair of levels)"
            )
        for factor in self.factors():
            if any(f not in (1, 2) for f in factor):
                raise ValueError(f"downsample factors must be 1 or 2 per axis, got {factor}")
        if self.mode == "2d" and any(f[0] != 1 for f in self.factors()):
            raise ValueError("a '2d' network cannot down-sample z: use factors (1, 2, 2)")
        if self.kernel_z is not None and (
            len(self.kernel_z) != len(self.widths) or any(k not in (1, 3) for k in self.kernel_z)
        ):
            raise ValueError(f"kernel_z needs one entry (1 or 3) per level ({len(self.widths)}), got {self.kernel_z}")
        if any(c < 0 for c in self.context):
            raise ValueError(f"context must be non-negative, got {self.context}")
        return self

    def factors(self) -> list[tuple[int, int, int]]:
        """Down-sampling factor between each pair of consecutive levels."""
        if self.downsample is None:
            return [(1, 2, 2)] * (len(self.widths) - 1)
        return [tuple(f) for f in self.downsample]  # type: ignore[misc]

    def kernels_z(self) -> list[int]:
        """z size of the residual-block kernels at each level."""
        if self.mode == "2d":
            return [1] * len(self.widths)
        return list(self.kernel_z) if self.kernel_z is not None else [3] * len(self.widths)

    def size_divisor(self) -> tuple[int, int, int]:
        """Factor every input dimension must be divisible by (product of the down-sampling factors)."""
        out = [1, 1, 1]
        for factor in self.factors():
            out = [o * f for o, f in zip(out, factor, strict=True)]
        return (out[0], out[1], out[2])
