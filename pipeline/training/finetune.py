"""Fine-tuning: the start checkpoint's network for a config without one, and the voxel size a run records.

A run trains at its data's voxel size and records it in every checkpoint it writes, so `segment` runs the new
network on data like it without resampling; a start checkpoint recorded at another voxel size is adapted to it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from pipeline.config import describe_validation_error
from pipeline.config.network import NetworkConfig
from pipeline.config.train import TrainConfig
from pipeline.errors import ConfigError
from pipeline.network.checkpoint import read_payload
from pipeline.network.inputs import VOXEL_SIZE_TOLERANCE, voxel_size_difference
from pipeline.training.data import LabelledRegion

logger = logging.getLogger(__name__)


def with_init_network(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with the network of its `init_from` checkpoint when it names one and has no `network` section."""
    if cfg.init_from is None or "network" in cfg.model_fields_set:
        return cfg
    network = NetworkConfig.model_validate_json(read_payload(cfg.init_from)["network_config"])
    try:
        return TrainConfig.model_validate({**cfg.model_dump(mode="json"), "network": network.model_dump(mode="json")})
    except ValidationError as err:
        raise ConfigError(
            describe_validation_error(err, f"the config with init_from {cfg.init_from}'s network")
        ) from err


def same_voxel_size(found: Sequence[float], reference: Sequence[float]) -> bool:
    """Whether two voxel sizes (z, y, x) in nm agree within segment's default tolerance on every axis."""
    return max(voxel_size_difference(found, reference)) <= VOXEL_SIZE_TOLERANCE


def training_voxel_size(
    regions: Sequence[LabelledRegion], init: dict[str, Any] | None, init_name: str | None
) -> tuple[float, float, float] | None:
    """The one voxel size (z, y, x, nm) of the training and validation regions, which the run's checkpoints record
    (None when no region knows its own); logs how it differs from the start checkpoint's."""
    known = [(r.name, r.voxel_size_nm) for r in regions if r.voxel_size_nm is not None]
    if not known:
        return None
    first_name, size = known[0]
    for name, other in known[1:]:
        if not same_voxel_size(other, size):
            raise ConfigError(
                f"{name} has voxel size {list(other)} nm but {first_name} has {list(size)} nm: a checkpoint records "
                "one voxel size, so train on volumes of one voxel size (resample the others first)"
            )
    start = None if init is None else init.get("voxel_size_nm")
    if start is not None and not same_voxel_size(start, size):
        logger.info(
            "%s was trained at %s nm, the data is at %s nm: fine-tuning adapts it to the data's voxel size, which "
            "the new checkpoints record",
            init_name,
            list(start),
            list(size),
        )
    return size
