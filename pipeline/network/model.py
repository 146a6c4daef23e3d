"""The segmentation network: an anisotropic residual 3D U-Net in the style of Res-UNet-R.

Input: float32 (N, C, Z, Y, X) with intensities scaled to [0, 1]; the network standardises with fixed
buffers. Output: logits (N, K, Z, Y, X), channel 0 = mitochondrion mask, channel 1 = contour (if K == 2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config.network import NetworkConfig
from pipeline.geometry import as_zyx


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


class PlanarConv3d(nn.Conv3d):
    """A Conv3d whose kernel and stride are 1 along z, computed as a 2D convolution over all slices.

    Same parameters and state dict as nn.Conv3d, but PyTorch's CPU Conv2d (forward and especially
    backward) is several times faster than Conv3d with a 1xkxk kernel.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, z, h, w = x.shape
        planes = x.transpose(1, 2).reshape(n * z, c, h, w)
        out = F.conv2d(planes, self.weight[:, :, 0], self.bias, self.stride[1:], self.padding[1:])
        return out.reshape(n, z, *out.shape[1:]).transpose(1, 2)


def _conv(cin: int, cout: int, kernel: tuple[int, int, int], stride: tuple[int, int, int] = (1, 1, 1)) -> nn.Conv3d:
    padding = (kernel[0] // 2, kernel[1] // 2, kernel[2] // 2)
    cls = PlanarConv3d if kernel[0] == 1 and stride[0] == 1 else nn.Conv3d
    return cls(cin, cout, kernel, stride=stride, padding=padding, bias=False)


class ConvNormAct(nn.Sequential):
    """Convolution, normalisation and ELU."""

    def __init__(
        self, cin: int, cout: int, kernel: tuple[int, int, int], norm: str, stride: tuple[int, int, int] = (1, 1, 1)
    ) -> None:
        super().__init__(_conv(cin, cout, kernel, stride), _norm(norm, cout), nn.ELU(inplace=True))


class ResidualBlock(nn.Module):
    """Two convolutions with an identity shortcut (Res-UNet-R's residual block)."""

    def __init__(self, channels: int, kernel: tuple[int, int, int], norm: str) -> None:
        super().__init__()
        self.conv1 = ConvNormAct(channels, channels, kernel, norm)
        self.conv2 = _conv(channels, channels, kernel)
        self.norm2 = _norm(norm, channels)
        self.act = nn.ELU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.norm2(self.conv2(self.conv1(x))))


class ProjectionHead(nn.Module):
    """1x1x1 conv, norm, ReLU, 1x1x1 conv to D channels, L2-normalised along channels (training only)."""

    def __init__(self, cin: int, dim: int, norm: str) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv3d(cin, cin, 1, bias=False), _norm(norm, cin), nn.ReLU(inplace=True), nn.Conv3d(cin, dim, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.body(x), dim=1)


class ResUNet(nn.Module):
    input_mean: torch.Tensor
    input_std: torch.Tensor

    """Anisotropic residual U-Net with additive skips, mask/contour heads and an optional projection head."""

    def __init__(self, cfg: NetworkConfig) -> None:
        super().__init__()
        self.config = cfg
        kz = cfg.kernels_z()
        widths = cfg.widths
        factors = cfg.factors()
        self.register_buffer("input_mean", torch.tensor(float(cfg.input_mean)), persistent=False)
        self.register_buffer("input_std", torch.tensor(float(cfg.input_std)), persistent=False)
        self.stem = ConvNormAct(cfg.in_channels, widths[0], (1, 5, 5), cfg.norm)
        self.encoders = nn.ModuleList()
        for level, width in enumerate(widths):
            if level == 0:
                entry: nn.Module = ConvNormAct(widths[0], width, (1, 3, 3), cfg.norm)
            else:
                fz = factors[level - 1][0]
                kernel = (3 if fz == 2 else 1, 3, 3)
                entry = ConvNormAct(widths[level - 1], width, kernel, cfg.norm, stride=factors[level - 1])
            self.encoders.append(nn.Sequential(entry, ResidualBlock(width, (kz[level], 3, 3), cfg.norm)))
        self.up_convs = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for level in range(len(widths) - 2, -1, -1):
            self.up_convs.append(ConvNormAct(widths[level + 1], widths[level], (1, 1, 1), cfg.norm))
            self.decoders.append(ResidualBlock(widths[level], (kz[level], 3, 3), cfg.norm))
        self.factors = factors
        self.head = nn.Conv3d(widths[0], cfg.out_channels, 1)
        self.projection: ProjectionHead | None = (
            ProjectionHead(widths[0], cfg.embedding_dim, cfg.norm) if cfg.projection_head else None
        )

    @property
    def context(self) -> tuple[int, int, int]:
        """Margin in voxels (z, y, x) per side that inference crops from each patch output."""
        return as_zyx(self.config.context, "network.context")

    @property
    def size_divisor(self) -> tuple[int, int, int]:
        """Every input dimension must be divisible by this (product of the down-sampling factors)."""
        return self.config.size_divisor()

    def drop_projection(self) -> None:
        """Remove the projection head (inference never needs it)."""
        self.projection = None

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        div = self.size_divisor
        if any(s % d for s, d in zip(x.shape[2:], div, strict=True)):
            raise ValueError(f"input spatial shape {tuple(x.shape[2:])} is not divisible by {div}")
        x = self.stem((x - self.input_mean) / self.input_std)
        skips = []
        for encoder in self.encoders:
            x = encoder(x)
            skips.append(x)
        skips.pop()
        for up_conv, decoder, factor in zip(self.up_convs, self.decoders, reversed(self.factors), strict=True):
            x = F.interpolate(up_conv(x), scale_factor=factor, mode="trilinear", align_corners=False)
            x = decoder(x + skips.pop())
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, K, Z, Y, X) for input (N, C, Z, Y, X) scaled to [0, 1]."""
        return self.head(self._features(x))

    def forward_train(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the L2-normalised projection embedding (N, D, Z, Y, X) of every voxel."""
        logits, features = self.forward_features(x)
        return logits, self.project(features)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the full-resolution decoder features (N, C0, Z, Y, X) the projection head reads."""
        features = self._features(x)
        return self.head(features), features

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Apply the (pointwise) projection head to features (N, C0, ...) of any spatial shape.

        Training projects only the sampled points: the head is 1x1x1, so this equals projecting every
        voxel and gathering, at a small fraction of the cost.
        """
        if self.projection is None:
            raise RuntimeError("this network has no projection head (built without it or dropped)")
        if features.dim() == 2:  # (M, C) points -> (1, C, M, 1, 1)
            out = self.projection(features.t()[None, :, :, None, None])
            return out[0, :, :, 0, 0].t()
        return self.projection(features)


def build_network(cfg: NetworkConfig) -> ResUNet:
    """Build the network a config describes (untrained)."""
    return ResUNet(cfg)
