"""Checkpoints that rebuild their network: weights, network config, content hash and training metadata.

Everything is stored as tensors, numbers, strings, lists and dicts so `torch.load(weights_only=True)`
reads it; configs travel as JSON strings.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import ValidationError

from pipeline.config.network import NetworkConfig
from pipeline.errors import ModelLoadError

if TYPE_CHECKING:
    from pipeline.network.model import ResUNet

FORMAT = "mitoseg-checkpoint"
DEFAULT_OVERLAP = (0.25, 0.25, 0.25)
"""The tile overlap of checkpoints that recommend none (those written before checkpoints recorded one)."""
INFERENCE_KEYS = ("threshold", "patch_shape", "margin", "overlap", "median_size")
"""The inference settings a checkpoint recommends: what `segment` uses where its job gives none."""
VERSION = 1
_TRAINING_ONLY = ("projection.",)
SHIPPED_DIR = Path(__file__).parent / "checkpoints"


def shipped_checkpoints() -> dict[str, Path]:
    """The checkpoints that ship with mitoseg (package data), by name: `lucchi` is checkpoints/lucchi.pt."""
    return {path.stem: path for path in sorted(SHIPPED_DIR.glob("*.pt"))}


def resolve_checkpoint(value: str | Path) -> Path:
    """The file a checkpoint value names: a shipped checkpoint's name (`lucchi`, `demo`), or else a path.

    Raises ModelLoadError, listing the shipped names, when neither names an existing file.
    """
    shipped = shipped_checkpoints()
    if str(value) in shipped:
        return shipped[str(value)]
    path = Path(value)
    if path.is_file():
        return path
    names = ", ".join(shipped) or "none"
    if len(path.parts) == 1 and not path.suffix:
        raise ModelLoadError(
            f"no shipped checkpoint is named {str(value)!r}: the shipped ones are {names}; "
            "or give the path to a checkpoint file (.pt)"
        )
    raise ModelLoadError(
        f"checkpoint {path} does not exist: pass the path to a checkpoint written by `mitoseg train`, "
        f"or a shipped one by name ({names})"
    )


def _voxel_size(value: Any, path: Path) -> tuple[float, float, float]:
    """A voxel size (z, y, x) in nm as three positive floats; raises ModelLoadError naming the checkpoint."""
    try:
        size = tuple(float(v) for v in value)
    except (TypeError, ValueError) as err:
        raise ModelLoadError(f"checkpoint {path}: voxel size {value!r} is not three numbers (z, y, x) in nm") from err
    if len(size) != 3 or not all(0 < v < float("inf") for v in size):
        raise ModelLoadError(f"checkpoint {path}: voxel size {value!r} is not three positive sizes (z, y, x) in nm")
    return size


def _inference_keys(state_dict: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k for k in state_dict if not k.startswith(_TRAINING_ONLY))


def content_hash(network_config: NetworkConfig, state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 of the network config and the weights inference uses (the projection head is left out)."""
    digest = hashlib.sha256(network_config.model_dump_json().encode())
    for key in _inference_keys(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(key.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.numpy().tobytes() if tensor.dtype != torch.bfloat16 else tensor.float().numpy().tobytes())
    return digest.hexdigest()


def save_checkpoint(
    path: str | Path,
    *,
    network_config: NetworkConfig,
    state_dict: dict[str, torch.Tensor],
    voxel_size_nm: Sequence[float] | None = None,
    **extra: Any,
) -> str:
    """Write a checkpoint atomically and return its content hash.

    `voxel_size_nm` (z, y, x) is the voxel size the network was trained at: `segment` refuses inputs far from it
    (None records none). Recognised extras: the inference settings `segment` uses by default (`threshold` float,
    `patch_shape`, `margin` and `overlap` (z, y, x), `median_size` odd int or 0: `INFERENCE_KEYS`),
    `metadata` (JSON-able dict with the training config, step and scores), and for resuming `optimizer`,
    `scheduler`, `step`, `rng`.
    """
    path = Path(path)
    if voxel_size_nm is not None:
        extra["voxel_size_nm"] = list(_voxel_size(voxel_size_nm, path))
    state = {k: v.detach().cpu() for k, v in state_dict.items()}
    digest = content_hash(network_config, state)
    payload: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "architecture": network_config.architecture,
        "network_config": network_config.model_dump_json(),
        "state_dict": state,
        "content_hash": digest,
    }
    for key, value in extra.items():
        payload[key] = json.dumps(value) if key == "metadata" else value
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return digest


@dataclass
class LoadedCheckpoint:
    """A checkpoint read back: the ready network (eval mode) and what inference needs to know."""

    network: ResUNet
    network_config: NetworkConfig
    content_hash: str
    threshold: float
    patch_shape: tuple[int, int, int]
    metadata: dict[str, Any]
    median_size: int = 0
    voxel_size_nm: tuple[float, float, float] | None = None  # (z, y, x) the network was trained at; None: unknown
    payload: dict[str, Any] = field(repr=False, default_factory=dict)
    margin: tuple[int, int, int] | None = None
    """Voxels cut from each side of every patch's prediction before blending; None: the network's context."""
    overlap: tuple[float, float, float] = DEFAULT_OVERLAP
    """Fraction by which neighbouring output tiles overlap, per axis."""


def read_payload(path: str | Path) -> dict[str, Any]:
    """The raw stored dict of a checkpoint path or shipped name (used by resume); raises ModelLoadError when
    unreadable."""
    path = resolve_checkpoint(path)
    hint = f"pass a checkpoint written by `mitoseg train` or a shipped one ({', '.join(shipped_checkpoints())})"
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ModelLoadError(f"checkpoint {path} cannot be read (corrupt or not a torch file: {err}); {hint}") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelLoadError(f"{path} is not a mitoseg checkpoint (no '{FORMAT}' format tag); {hint}")
    if payload.get("version") != VERSION:
        raise ModelLoadError(
            f"checkpoint {path} has format version {payload.get('version')}, this mitoseg reads {VERSION}; "
            "retrain or use a matching mitoseg version"
        )
    return payload


def trained_voxel_size(path: str | Path) -> tuple[float, float, float] | None:
    """The voxel size (z, y, x) in nm a checkpoint records its network was trained at, or None (reads no weights
    into a network)."""
    path = resolve_checkpoint(path)
    voxel = read_payload(path).get("voxel_size_nm")
    return None if voxel is None else _voxel_size(voxel, path)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Rebuild the network of a checkpoint (path or shipped name) in eval mode on `device`, without its projection
    head."""
    from pipeline.network.model import build_network

    path = resolve_checkpoint(path)
    payload = read_payload(path)
    try:
        cfg = NetworkConfig.model_validate_json(payload["network_config"])
    except (KeyError, ValidationError) as err:
        raise ModelLoadError(f"checkpoint {path} has no valid network config ({err}); retrain it") from err
    state = payload.get("state_dict")
    if not isinstance(state, dict):
        raise ModelLoadError(f"checkpoint {path} holds no weights; retrain it")
    digest = content_hash(cfg, state)
    if payload.get("content_hash") != digest:
        raise ModelLoadError(
            f"checkpoint {path} is corrupt: its weights hash to {digest[:12]} but it records "
            f"{str(payload.get('content_hash'))[:12]}; copy it again or retrain"
        )
    network = build_network(cfg)
    network.drop_projection()
    inference_state = {k: state[k] for k in _inference_keys(state)}
    try:
        network.load_state_dict(inference_state, strict=True)
    except RuntimeError as err:
        raise ModelLoadError(f"checkpoint {path} does not match its network config: {err}") from err
    network.to(device).eval()
    patch = tuple(int(s) for s in payload.get("patch_shape", (16, 128, 128)))
    div = cfg.size_divisor()
    if len(patch) != 3 or any(p % d for p, d in zip(patch, div, strict=True)):
        raise ModelLoadError(f"checkpoint {path} recommends patch shape {patch}, not divisible by {div}; retrain")
    median = payload.get("median_size", 0)
    if not isinstance(median, int) or median < 0 or (median and median % 2 == 0):
        raise ModelLoadError(f"checkpoint {path} recommends median size {median!r}, not 0 or odd; export it again")
    margin = payload.get("margin")
    context = network.context
    if margin is not None and (len(margin) != 3 or any(int(m) < c for m, c in zip(margin, context, strict=True))):
        raise ModelLoadError(
            f"checkpoint {path} recommends margin {margin}, less than the network's context {context}; "
            "export it again with a margin of at least the context"
        )
    overlap = tuple(float(f) for f in payload.get("overlap", DEFAULT_OVERLAP))
    if len(overlap) != 3 or not all(0 <= f < 1 for f in overlap):
        raise ModelLoadError(f"checkpoint {path} recommends overlap {list(overlap)}, not 3 fractions in [0, 1)")
    try:
        metadata = json.loads(payload.get("metadata", "{}"))
    except (TypeError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"checkpoint {path} has unreadable metadata ({err}); retrain it") from err
    voxel = payload.get("voxel_size_nm")
    return LoadedCheckpoint(
        network=network,
        network_config=cfg,
        content_hash=digest,
        threshold=float(payload.get("threshold", 0.5)),
        patch_shape=patch,
        metadata=metadata,
        median_size=median,
        voxel_size_nm=None if voxel is None else _voxel_size(voxel, path),
        payload=payload,
        margin=None if margin is None else tuple(int(m) for m in margin),  # type: ignore[arg-type]
        overlap=overlap,
    )


def checkpoint_info(value: str | Path) -> dict[str, Any]:
    """What a checkpoint (path or shipped name) holds, as JSON-able facts: network, recommendations, training."""
    path = resolve_checkpoint(value)
    loaded = load_checkpoint(path)
    meta = loaded.metadata
    training: dict[str, Any] = {
        k: meta[k] for k in ("step", "split", "scores", "world_size", "voxel_size_nm") if k in meta
    }
    if "train_config" in meta:
        training["train_config"] = meta["train_config"].get("name")
    if "weight_average_of" in meta:
        training["weight_average_of"] = [source.get("content_hash") for source in meta["weight_average_of"]]
    return {
        "path": str(path),
        "architecture": loaded.network_config.architecture,
        "parameters": sum(p.numel() for p in loaded.network.parameters()),
        "weights": "/".join(sorted(_weight_dtypes(loaded.payload["state_dict"]))),
        "content_hash": loaded.content_hash,
        "threshold": loaded.threshold,
        "median_size": loaded.median_size,
        "voxel_size_nm": None if loaded.voxel_size_nm is None else list(loaded.voxel_size_nm),
        "patch_shape": list(loaded.patch_shape),
        "margin": list(loaded.margin or loaded.network.context),
        "overlap": list(loaded.overlap),
        "out_channels": loaded.network_config.out_channels,
        "network_config": loaded.network_config.model_dump(mode="json"),
        "training": training,
    }


def _weight_dtypes(state: dict[str, torch.Tensor]) -> set[str]:
    """The floating-point types the weights are stored in (float16 after `export --half`; they run as float32)."""
    return {str(v.dtype).removeprefix("torch.") for v in state.values() if v.is_floating_point()}


def export_checkpoint(source: str | Path, target: str | Path, half: bool = False, **recommend: Any) -> str:
    """Copy a training checkpoint without optimizer state and projection head (small, for shipping).

    `half` stores the floating-point weights as float16: half the bytes, for a checkpoint that must travel or live
    in a repository (the network still runs in float32; its outputs move by float16's rounding, and so does its
    content hash). `recommend` records inference settings `segment` uses by default (`INFERENCE_KEYS`: e.g. the
    median size and threshold measured with experiments/postprocess.py, or the patch, margin and overlap measured
    with experiments/inference/settings.py, all on data the run was not trained on); unnamed ones keep the source's.
    None of them changes the content hash, which covers config and weights.
    """
    return average_checkpoints([source], target, half=half, **recommend)


def check_recommendations(recommend: dict[str, Any], target: str | Path) -> dict[str, Any]:
    """`recommend` without its None values, refused (ValueError naming `target`) where a value cannot work."""
    given = {k: v for k, v in recommend.items() if v is not None}
    unknown = sorted(set(given) - set(INFERENCE_KEYS))
    if unknown:
        raise ValueError(f"{target}: {unknown} are not inference settings; a checkpoint records {INFERENCE_KEYS}")
    threshold, median = given.get("threshold"), given.get("median_size")
    if threshold is not None and not 0 < threshold < 1:
        raise ValueError(f"threshold {threshold} for {target}: give a probability strictly between 0 and 1")
    if median is not None and (median < 0 or median % 2 == 0 and median):
        raise ValueError(f"median size {median} for {target}: give an odd size (a centre voxel), or 0 for none")
    for key in ("patch_shape", "margin", "overlap"):
        if key in given:
            if len(given[key]) != 3:
                raise ValueError(f"{key} {given[key]} for {target}: give one value per axis (z, y, x)")
            given[key] = [float(v) if key == "overlap" else int(v) for v in given[key]]
    return given


def average_checkpoints(sources: Sequence[str | Path], target: str | Path, half: bool = False, **recommend: Any) -> str:
    """Write the uniform average of the inference weights of `sources` (a "model soup", Wortsman et al. 2022),
    small as `export_checkpoint` writes it, and return its content hash.

    Meant for checkpoints of one network fine-tuned from the same start (weights of unrelated runs do not
    average into a working network); every source must hold the same network config. Floating-point tensors,
    batch-norm statistics included, are averaged; integer buffers come from the first source, as do the voxel size
    and the inference settings not given in `recommend` (see `export_checkpoint`, also for `half`). One source is a
    plain export (its step and metadata kept).
    """
    if not sources:
        raise ValueError(f"no checkpoints to write into {target}: give at least one source")
    given = check_recommendations(recommend, target)
    payloads = [read_payload(source) for source in sources]
    cfg = NetworkConfig.model_validate_json(payloads[0]["network_config"])
    for source, payload in zip(sources[1:], payloads[1:], strict=True):
        if NetworkConfig.model_validate_json(payload["network_config"]) != cfg:
            raise ModelLoadError(
                f"checkpoint {source} holds another network than {sources[0]}: only checkpoints of one network "
                "config can be averaged"
            )
    first = payloads[0]["state_dict"]
    state = {}
    for key, value in first.items():
        if key.startswith(_TRAINING_ONLY):
            continue
        if value.is_floating_point() and len(payloads) > 1:
            value = torch.stack([p["state_dict"][key].float() for p in payloads]).mean(0).to(value.dtype)
        state[key] = value.half() if half and value.is_floating_point() else value
    extra: dict[str, Any] = {k: payloads[0][k] for k in (*INFERENCE_KEYS, "voxel_size_nm", "step") if k in payloads[0]}
    extra.update(given)
    if len(payloads) == 1:
        extra["metadata"] = json.loads(payloads[0].get("metadata", "{}"))
    else:
        extra.pop("step", None)
        splits = {json.loads(p.get("metadata", "{}")).get("split") for p in payloads}
        extra["metadata"] = {
            "split": splits.pop() if len(splits) == 1 else None,  # the data split, when all sources share one
            "weight_average_of": [
                {"path": str(source), "content_hash": p.get("content_hash")}
                for source, p in zip(sources, payloads, strict=True)
            ],
        }
    return save_checkpoint(target, network_config=cfg, state_dict=state, **extra)
