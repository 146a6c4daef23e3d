"""The network: shapes, context and divisor, embedding, determinism, config validation."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from pipeline.config.network import NetworkConfig
from pipeline.network.model import build_network


def _net(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_network(NetworkConfig(widths=[4, 8, 8], embedding_dim=8, **kwargs))


@pytest.mark.parametrize("out_channels", [1, 2])
def test_logits_have_input_shape_and_k_channels(out_channels: int) -> None:
    net = _net(out_channels=out_channels).eval()
    x = torch.rand(2, 1, 4, 16, 24)
    with torch.no_grad():
        out = net(x)
    assert out.shape == (2, out_channels, 4, 16, 24)
    assert out.dtype == torch.float32


def test_context_and_size_divisor_come_from_config() -> None:
    net = _net(downsample=[(1, 2, 2), (2, 2, 2)], context=(1, 8, 8))
    assert net.size_divisor == (2, 4, 4)
    assert net.context == (1, 8, 8)
    with pytest.raises(ValueError, match="divisible"):
        net(torch.rand(1, 1, 3, 16, 16))


def test_forward_train_returns_unit_norm_embedding_and_same_logits() -> None:
    net = _net().eval()
    x = torch.rand(1, 1, 2, 8, 8)
    with torch.no_grad():
        logits, emb = net.forward_train(x)
        assert torch.equal(logits, net(x))
    assert emb.shape == (1, 8, 2, 8, 8)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(1, 2, 8, 8))


def test_point_projection_equals_dense_projection() -> None:
    net = _net().eval()
    x = torch.rand(1, 1, 2, 8, 8)
    with torch.no_grad():
        _, features = net.forward_features(x)
        dense = net.project(features)
        points = net.project(features[0, :, 1, 3, :].t())  # (8 points, C)
    torch.testing.assert_close(points, dense[0, :, 1, 3, :].t())


def test_eval_is_deterministic_and_projection_can_be_dropped() -> None:
    net = _net().eval()
    x = torch.rand(1, 1, 2, 8, 8)
    with torch.no_grad():
        first, second = net(x), net(x)
    assert torch.equal(first, second)
    net.drop_projection()
    assert not any(k.startswith("projection.") for k in net.state_dict())
    with pytest.raises(RuntimeError, match="projection"):
        net.forward_train(x)


def test_2d_mode_uses_in_plane_kernels_only() -> None:
    net = _net(mode="2d")
    kernels = {m.kernel_size[0] for m in net.modules() if isinstance(m, torch.nn.Conv3d)}
    assert kernels == {1}


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"downsample": [(1, 2, 2)]}, "exactly 2 factors"),
        ({"downsample": [(1, 3, 2), (1, 2, 2)]}, "1 or 2"),
        ({"mode": "2d", "downsample": [(2, 2, 2), (1, 2, 2)]}, "cannot down-sample z"),
        ({"kernel_z": [3, 3]}, "one entry"),
        ({"unknown": 1}, "Extra inputs"),
    ],
)
def test_bad_network_configs_are_refused(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValidationError, match=pattern):
        NetworkConfig(widths=[4, 8, 8], **kwargs)
