"""Training patches: origins stay inside the region unless allowed to overhang, and overhangs are mirrored."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from pipeline.config.train import AugmentConfig, DataConfig
from pipeline.training.data import LabelledRegion, PatchSampler, crop_mirrored
from pipeline.training.prefetch import BatchPrefetcher, step_batch

SHAPE = (8, 32, 32)
NO_AUGMENT = AugmentConfig(flip=False, rot90=False, intensity=0, elastic=0, missing_section=0, misalignment=0, blur=0)


def _region(seed: int = 0) -> LabelledRegion:
    raw = np.random.default_rng(seed).integers(0, 256, (12, 40, 48), dtype=np.uint8)
    return LabelledRegion(raw, (raw > 127).astype(np.uint8), "synthetic")


def _sampler(overhang: float, foreground: float = 0.0) -> PatchSampler:
    data = DataConfig(
        volumes=[{"raw": "r", "label": "l"}],
        patch_shape=SHAPE,
        foreground_oversample=foreground,
        border_overhang=overhang,
    )
    return PatchSampler([_region()], data, NO_AUGMENT)


@pytest.mark.parametrize("start", [(0, 0, 0), (4, 8, 16), (-3, -10, 5), (6, 20, 30), (-4, 30, -16)])
def test_crop_mirrored_equals_a_crop_of_the_reflect_padded_array(start: tuple[int, int, int]) -> None:
    array = _region().raw
    padded = np.pad(array, [(p, p) for p in SHAPE], mode="reflect")
    box = tuple(slice(s + p, s + p + n) for s, p, n in zip(start, SHAPE, SHAPE, strict=True))
    np.testing.assert_array_equal(crop_mirrored(array, np.array(start), SHAPE), padded[box])


@pytest.mark.parametrize("foreground", [0.0, 1.0])
def test_patches_stay_inside_without_overhang(foreground: float) -> None:
    sampler, rng = _sampler(0.0, foreground), np.random.default_rng(1)
    limit = np.array(_region().raw.shape) - np.array(SHAPE)
    starts = np.array([sampler.start(0, rng) for _ in range(400)])
    assert (starts >= 0).all() and (starts <= limit).all()


@pytest.mark.parametrize("foreground", [0.0, 1.0])
def test_overhang_reaches_past_every_border_and_no_further(foreground: float) -> None:
    sampler, rng = _sampler(0.5, foreground), np.random.default_rng(2)
    reach = np.array(SHAPE) // 2
    limit = np.array(_region().raw.shape) - np.array(SHAPE)
    starts = np.array([sampler.start(0, rng) for _ in range(2000)])
    assert (starts >= -reach).all() and (starts <= limit + reach).all()
    assert (starts.min(axis=0) < 0).all() and (starts.max(axis=0) > limit).all()


def test_overhanging_patches_keep_raw_and_label_aligned() -> None:
    sampler, rng = _sampler(0.5), np.random.default_rng(3)
    for _ in range(50):
        raw, label = sampler.patch(rng)
        assert raw.shape == label.shape == SHAPE
        np.testing.assert_array_equal(label, (np.rint(raw * 255) > 127).astype(np.uint8))


def test_worker_processes_make_the_same_batches_as_in_line_even_after_a_jump() -> None:
    sampler = _sampler(0.25, foreground=0.5)
    steps = [0, 1, 2, 3, 10, 11, 5]  # a resume jumps ahead; an earlier step after that starts afresh
    expected = [step_batch(sampler, 7, 1, step, 2) for step in steps]
    with BatchPrefetcher(sampler, 7, 1, 2, workers=2) as prefetcher:
        made = [prefetcher.batch(step) for step in steps]
    for step, want, got in zip(steps, expected, made, strict=True):
        assert got[0] == want[0], step
        np.testing.assert_array_equal(got[1], want[1], err_msg=f"raw of step {step}")
        np.testing.assert_array_equal(got[2], want[2], err_msg=f"label of step {step}")
    assert len({b[0] for b in expected}) == len(steps)  # each step has its own generator seed
    assert prefetcher.pool is None


def test_closing_while_workers_hand_over_large_batches_does_not_hang() -> None:
    """Terminating a pool while a worker writes a batch larger than the pipe's buffer deadlocked (1 in 6 here)."""
    sampler = _sampler(0.25, foreground=0.5)

    def make_one_and_close() -> None:
        with BatchPrefetcher(sampler, 7, 1, 16, workers=2) as prefetcher:  # 16 patches: 0.5 MB per batch
            prefetcher.batch(0)

    for _ in range(15):
        thread = threading.Thread(target=make_one_and_close, daemon=True)
        thread.start()
        thread.join(30)
        assert not thread.is_alive(), "closing the prefetcher hung"
