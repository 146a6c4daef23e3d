"""The per-block work of the instance stage, run inside Dask workers: decode, match, relabel.

Each task is a small picklable object holding what the block needs (URLs, region, resolved decoding
settings); volumes are opened once per worker process and cached. Per-block summaries go to small files beside
the output, so that a resumed run finds those of skipped blocks: `border/` (the objects that touch a face between
blocks, which the client merges), `interior/` (the block's other kept objects, which only its relabel task and the
table read), `match/` (face pairs) and, from the merge, `map/` (final IDs of the block's border objects).
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from daisy import Block, Roi

from pipeline.config.instances import DecodeConfig
from pipeline.errors import StorageError
from pipeline.instances.decode import decode_block, decode_component, probabilities, seed_mask
from pipeline.instances.fixup import Fixup
from pipeline.instances.ids import block_base, to_provisional
from pipeline.instances.matching import adjacent_pairs, face_contacts, low_faces
from pipeline.instances.measure import block_stats
from pipeline.instances.merge import interior_finals, split_block
from pipeline.volumes import Volume, open_volume


@lru_cache(maxsize=16)
def cached_volume(url: str, mode: str, run: str) -> Volume:
    """A volume opened once per worker process and run (`run` keeps a re-created volume from being stale)."""
    return open_volume(url, mode=mode)


class BlockFiles:
    """Small per-block .npz files under one storage location (any cloud-files URL)."""

    def __init__(self, location: str):
        self.location = location

    def _files(self) -> Any:
        from cloudfiles import CloudFiles

        return CloudFiles(self.location, progress=False)

    def put(self, name: str, **arrays: np.ndarray) -> None:
        self.put_many({name: arrays})

    def put_many(self, files: dict[str, dict[str, np.ndarray]]) -> None:
        """Write several files at once (in parallel on object stores)."""

        def encoded(arrays: dict[str, np.ndarray]) -> bytes:
            buffer = io.BytesIO()
            np.savez(buffer, **arrays)  # type: ignore[arg-type]  # numpy stubs mistype **kwds
            return buffer.getvalue()

        try:
            self._files().puts(
                ((name, encoded(arrays)) for name, arrays in files.items()),
                compress=None,
                content_type="application/octet-stream",
                total=len(files),
            )
        except Exception as err:
            raise StorageError(f"cannot write {len(files)} per-block file(s) at {self.location}: {err}") from err

    def get(self, name: str) -> dict[str, np.ndarray]:
        return self.get_many([name])[0]

    def find(self, name: str) -> dict[str, np.ndarray] | None:
        """The arrays of the named file, or None when it is missing or unreadable (e.g. cut short by a crash)."""
        try:
            return self.get(name)
        except (StorageError, OSError, ValueError, EOFError, zipfile.BadZipFile):
            return None

    def get_many(self, names: list[str]) -> list[dict[str, np.ndarray]]:
        """The arrays of each named file, in order; a missing file is an error naming it."""
        if not names:
            return []
        results = {r["path"]: r for r in self._files().get(names)}
        out = []
        for name in names:
            entry = results.get(name)
            if entry is None or entry.get("error") is not None or entry.get("content") is None:
                error = entry.get("error") if entry else "missing"
                raise StorageError(
                    f"per-block file {name} at {self.location} cannot be read ({error}); run again without resume"
                )
            with np.load(io.BytesIO(entry["content"])) as data:
                out.append({k: data[k] for k in data.files})
        return out


@dataclass(frozen=True)
class StageSpec:
    """What every block task of one job needs."""

    input_url: str
    scratch_url: str
    files: str
    region: Roi
    stride: int
    decode: DecodeConfig
    run: str
    """A token unique to this run, so that workers reopen volumes that an earlier run re-created."""

    def volume(self, url: str, mode: str = "r") -> Volume:
        return cached_volume(url, mode, self.run)


@dataclass(frozen=True)
class DecodeTask:
    """Pass 1: decode a block, write its provisional IDs, store its border and kept interior objects."""

    spec: StageSpec

    def __call__(self, block: Block) -> int:
        spec, roi, block_id = self.spec, block.write_roi, block.block_id[1]
        decoded = decode_block(spec.volume(spec.input_url).read(roi), spec.decode)
        spec.volume(spec.scratch_url, "r+").write(roi, to_provisional(decoded.labels, block_id, spec.stride)[None])
        low = [b <= r for b, r in zip(roi.begin, spec.region.begin, strict=True)]
        high = [e >= r for e, r in zip(roi.end, spec.region.end, strict=True)]
        stats = block_stats(decoded.labels, decoded.num_labels, decoded.num_seeded, roi.begin, low, high)
        base = np.uint64(block_base(block_id, spec.stride))
        stats.ids = stats.ids + base
        components = stats.ids if decoded.components is None else decoded.components.astype(np.uint64) + base
        border, interior = split_block(stats, components, roi, low, high, spec.decode.min_size)
        BlockFiles(spec.files).put_many(
            {
                f"border/{block_id}.npz": border.to_arrays(),
                f"interior/{block_id}.npz": {"num_labels": np.array(decoded.num_labels), **interior.to_arrays()},
            }
        )
        return decoded.num_labels


@dataclass(frozen=True)
class MatchTask:
    """Pass 2: pairs of provisional IDs adjacent across the block's low faces, and face contacts."""

    spec: StageSpec

    def __call__(self, block: Block) -> int:
        spec, cfg = self.spec, self.spec.decode
        scratch = spec.volume(spec.scratch_url)
        links, touches, contacts = [], [], []
        for face in low_faces(block.write_roi, spec.region):
            own, other = scratch.read(face.own)[0], scratch.read(face.other)[0]
            if cfg.method == "watershed":
                source = spec.volume(spec.input_url)
                own_seed = seed_mask(probabilities(source.read(face.own)), cfg)
                other_seed = seed_mask(probabilities(source.read(face.other)), cfg)
                links.append(adjacent_pairs(face, own, other, cfg.connectivity, own_seed, other_seed))
                touches.append(adjacent_pairs(face, own, other, cfg.connectivity))
            else:
                links.append(adjacent_pairs(face, own, other, cfg.connectivity))
            contacts.append(face_contacts(face, own, other))
        BlockFiles(spec.files).put(
            f"match/{block.block_id[1]}.npz",
            links=np.concatenate([np.zeros((0, 2), np.uint64), *links]),
            touches=np.concatenate([np.zeros((0, 2), np.uint64), *touches]),
            contacts=np.concatenate([np.zeros((0, 4), np.uint64), *contacts]),
        )
        return sum(len(x) for x in links + touches)


@dataclass(frozen=True)
class RelabelTask:
    """Pass 3: map the block's provisional IDs to final IDs and write them into the output.

    Its map holds the final IDs of the block's border objects and the range of final IDs rooted in the block;
    its kept interior objects take the IDs of that range that the border objects leave (`interior_finals`)."""

    spec: StageSpec
    output_url: str
    dtype: str

    def __call__(self, block: Block) -> int:
        spec, roi, block_id = self.spec, block.write_roi, block.block_id[1]
        maps, interior = BlockFiles(spec.files).get_many([f"map/{block_id}.npz", f"interior/{block_id}.npz"])
        base = np.uint64(block_base(block_id, spec.stride))
        table = np.zeros(int(interior["num_labels"]) + 1, np.uint64)
        table[maps["labels"]] = maps["final"]
        first, end = int(maps["first"]), int(maps["end"])
        inner = (interior["ids"] - base).astype(np.intp)
        table[inner] = interior_finals(first, end, maps["final"], len(inner))
        labels = spec.volume(spec.scratch_url).read(roi)[0]
        local = np.where(labels == 0, np.uint64(0), labels - base).astype(np.intp)
        out = table[local].astype(self.dtype)
        offsets = maps["fixup_offsets"].tolist()
        for i, key in enumerate(maps["fixups"].tolist()):
            self._overlay(out, roi, key, maps["fixup_final"][offsets[i] : offsets[i + 1]])
        spec.volume(self.output_url, "r+").write(roi, out[None])
        return int(len(table) - 1)

    def _overlay(self, out: np.ndarray, roi: Roi, key: int, final: np.ndarray) -> None:
        """Write the final IDs of a component decoded as a whole where its box meets the block."""
        stored = BlockFiles(self.spec.files).get(f"fixup/{key}.npz")
        labels, begin = stored["labels"], stored["begin"]
        box = Roi(tuple(int(b) for b in begin), labels.shape).intersect(roi)
        inner = tuple(slice(b - o, e - o) for b, e, o in zip(box.begin, box.end, begin.tolist(), strict=True))
        outer = tuple(slice(b - o, e - o) for b, e, o in zip(box.begin, box.end, roi.begin, strict=True))
        crop = labels[inner]
        view = out[outer]
        view[crop != 0] = final[crop[crop != 0]].astype(out.dtype)


@dataclass(frozen=True)
class FixupTask:
    """Decode one foreground component that crosses block borders with several seeds, as a whole.

    Stores the component's local labels over its bounding box for the relabel pass and returns the statistics
    of its objects (local IDs 1..k). With `reuse` (a resumed run whose decode and match passes were kept), labels
    an earlier run stored for the component are measured again instead of decoded again.
    """

    spec: StageSpec
    reuse: bool = False

    def __call__(self, fixup: Fixup) -> dict[str, np.ndarray]:
        spec, roi = self.spec, fixup.roi
        files, name = BlockFiles(spec.files), f"fixup/{fixup.key}.npz"
        stored = files.find(name) if self.reuse else None
        if stored is not None:
            labels = stored["labels"]
        else:
            probs = probabilities(spec.volume(spec.input_url).read(roi))
            inside = np.isin(spec.volume(spec.scratch_url).read(roi)[0], fixup.members)
            labels, _ = decode_component(probs, inside, spec.decode)
            files.put(name, labels=labels, begin=np.array(roi.begin, np.int64))
        k = int(labels.max(initial=0))  # watershed gives every seed component its own label 1..k
        return block_stats(labels, k, k, roi.begin).to_arrays()
