"""Blockwise instances equal whole-volume decoding up to renumbering; measurements and resume hold too."""

from __future__ import annotations

from pathlib import Path

import cc3d
import numpy as np
import pytest
from scipy import ndimage

from pipeline.config.instances import InstancesConfig
from pipeline.instances.decode import SKIMAGE_CONNECTIVITY
from pipeline.instances.measure import measure_labels
from pipeline.instances.run import run_instances
from pipeline.synthetic import generate_volume
from pipeline.volumes import VolumeMeta, create_volume, open_volume

SHAPE = (16, 28, 30)  # not a multiple of any block below
CHUNKS = (4, 4, 8)
BLOCKS = [(8, 8, 8), (4, 12, 16), (12, 16, 8)]
WHOLE = (16, 28, 32)  # one block over the whole volume: the reference decoding
VOXEL_NM = (8.0, 4.0, 4.0)


def noise_mask(shape: tuple[int, int, int], seed: int, sigma: float = 1.5) -> np.ndarray:
    """Smooth random field in [0, 1]: thresholded, a labyrinth of blobs crossing block faces, edges and corners."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=shape), sigma)
    return (field - field.min()) / np.ptp(field)


def generator_probabilities(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """(2, z, y, x) mask and contour probabilities from the project's synthetic mitochondria."""
    _, label = generate_volume(shape, seed, mito_fraction=0.15)
    mask = ndimage.gaussian_filter(label.astype(np.float32), 1.0)
    contour = ndimage.gaussian_gradient_magnitude(mask, 1.0)
    return np.stack([mask / max(mask.max(), 1e-6), contour / max(contour.max(), 1e-6)])


def write_probs(url: str, probs: np.ndarray, offset: tuple[int, int, int] = (0, 0, 0), **provenance: float) -> str:
    """Store (c, z, y, x) probabilities as uint8 (probability x 255), as `segment` does."""
    meta = VolumeMeta(
        shape=probs.shape[1:],
        dtype=np.dtype(np.uint8),
        chunks=CHUNKS,
        num_channels=probs.shape[0],
        voxel_size_nm=VOXEL_NM,
        voxel_offset=offset,
    )
    volume = create_volume(url, meta)
    volume.write(meta.roi, np.round(probs * 255).astype(np.uint8))
    if provenance:
        volume.set_provenance(dict(provenance))
    return url


def seeded_components(mask: np.ndarray, connectivity: int = 6, threshold: float = 0.5, seed: float = 0.85):
    """Whole-volume oracle of the components method: components of mask > threshold holding a voxel > seed."""
    labels = cc3d.connected_components(mask > threshold, connectivity=connectivity)
    seeded = np.unique(labels[mask > seed])
    return np.where(np.isin(labels, seeded[seeded > 0]), labels, 0)


def same_up_to_renumbering(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two label arrays describe the same objects (a one-to-one map between their IDs)."""
    if not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]], axis=1), axis=0)
    return len(pairs) == len(np.unique(pairs[:, 0])) == len(np.unique(pairs[:, 1]))


def run(client, tmp: Path, source: str, block, name: str | None = None, **settings):
    """Run the stage and return (labels, result)."""
    output = str(tmp / f"{name or 'seg_' + '_'.join(map(str, block))}.zarr")
    decode = settings.pop("decode", {})
    cfg = InstancesConfig(
        input=source, output=output, block_size=block, decode=decode, **{"viewing": False, **settings}
    )
    result = run_instances(cfg, client, progress=False)
    assert result.ok, result.failures
    return read_labels(output), result


def read_labels(url: str) -> np.ndarray:
    volume = open_volume(url)
    return volume.read(volume.meta.roi)[0]


def uint8_probs(probs: np.ndarray) -> np.ndarray:
    """The probabilities the stage sees after uint8 storage."""
    return np.round(probs * 255).astype(np.uint8).astype(np.float32) / np.float32(255)


def remove_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    ids, counts = np.unique(labels, return_counts=True)
    small = ids[(counts < min_size) & (ids != 0)]
    return np.where(np.isin(labels, small), 0, labels)


@pytest.mark.parametrize("connectivity", [6, 26])
def test_components_equal_whole_volume_for_every_block_size(client, tmp_path, connectivity):
    mask = noise_mask(SHAPE, seed=1)
    source = write_probs(str(tmp_path / "probs.zarr"), mask[None])
    decode = {"connectivity": connectivity, "min_size": 4}
    whole, _ = run(client, tmp_path, source, WHOLE, name="whole", decode=decode)
    probs = uint8_probs(mask[None])[0]
    oracle = remove_small(seeded_components(probs, connectivity), 4)
    unseeded = remove_small(cc3d.connected_components(probs > 0.5, connectivity=connectivity), 4)
    assert len(np.unique(oracle)) < len(np.unique(unseeded))  # the data holds faint blobs that seeding drops
    assert same_up_to_renumbering(whole, oracle)
    assert np.array_equal(np.unique(whole), np.arange(len(np.unique(oracle))))  # consecutive IDs 1..N
    for block in BLOCKS:
        labels, result = run(client, tmp_path, source, block, decode=decode)
        assert same_up_to_renumbering(labels, whole), block
        assert result.equivalences > 0


def test_objects_cross_block_corners_and_span_many_blocks(client, tmp_path):
    """The data of the equality tests has the hard cases: corners and objects over more than two blocks."""
    mask = noise_mask(SHAPE, seed=1)
    labels = cc3d.connected_components(mask > 0.5, connectivity=6)
    block = np.array(BLOCKS[0])
    spans = []
    for obj in ndimage.find_objects(labels):
        lo = np.array([s.start for s in obj]) // block
        hi = (np.array([s.stop for s in obj]) - 1) // block
        spans.append(int(np.prod(hi - lo + 1)))
    assert max(spans) > 2
    corners = [  # the 2x2x2 voxels around every inner block corner, one voxel in each of 8 blocks
        labels[z - 1 : z + 1, y - 1 : y + 1, x - 1 : x + 1].ravel()
        for z in range(8, SHAPE[0], 8)
        for y in range(8, SHAPE[1], 8)
        for x in range(8, SHAPE[2], 8)
    ]
    assert any(np.bincount(c[c > 0]).max() >= 4 for c in corners if c.any())


def test_diagonal_contact_across_a_corner_joins_only_with_26_connectivity(client, tmp_path):
    mask = np.zeros((16, 16, 16), np.float32)
    mask[4:8, 4:8, 4:8] = 1.0  # ends at the corner (8, 8, 8) of 8x8x8 blocks
    mask[8:12, 8:12, 8:12] = 1.0  # starts diagonally across it
    source = write_probs(str(tmp_path / "probs.zarr"), mask[None])
    six, _ = run(client, tmp_path, source, (8, 8, 8), name="six", decode={"connectivity": 6, "min_size": 0})
    full, _ = run(client, tmp_path, source, (8, 8, 8), name="full", decode={"connectivity": 26, "min_size": 0})
    assert len(np.unique(six)) == 3
    assert len(np.unique(full)) == 2


def watershed_oracle(probs: np.ndarray, min_size: int, connectivity: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Whole-volume seeded watershed (the default decoding settings) and its seed mask, computed directly in one call.

    Ties between equal mask values are broken by raster order (the stage's documented rule): the flooding
    priority is the rank of each voxel by (mask descending, raster index ascending) over the whole volume.
    """
    from skimage.segmentation import watershed

    mask, contour = probs
    foreground = mask > 0.8
    seeds = (mask > 0.85) & (contour < 0.6) & foreground
    markers = cc3d.connected_components(seeds, connectivity=connectivity)
    flat = mask.ravel()
    priority = np.empty(flat.size, np.float64)
    priority[np.lexsort((np.arange(flat.size), -flat))] = np.arange(flat.size)
    labels = watershed(
        priority.reshape(mask.shape), markers, mask=foreground, connectivity=SKIMAGE_CONNECTIVITY[connectivity]
    )
    return remove_small(labels, min_size), seeds


def test_watershed_whole_volume_matches_direct_watershed(client, tmp_path):
    probs = generator_probabilities(SHAPE, seed=3)
    source = write_probs(str(tmp_path / "probs.zarr"), probs)
    whole, result = run(client, tmp_path, source, WHOLE, name="whole", decode={"min_size": 8})
    oracle, _ = watershed_oracle(uint8_probs(probs), 8)
    assert result.num_objects > 1
    assert same_up_to_renumbering(whole, oracle)


def touching_sphere_probabilities(shape: tuple[int, int, int], seed: int, count: int = 16) -> np.ndarray:
    """(2, z, y, x) probabilities of random overlapping spheres: one foreground region holds many seeds.

    The mask is a plateau inside every sphere (ties everywhere after uint8 storage) fading at the rim; the
    contour is high on the interfaces between spheres, so each sphere's core becomes its own seed.
    """
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, 1, (count, 3)) * np.array(shape)
    return sphere_probabilities(shape, centres, rng.uniform(3.0, 6.0, count))


def sphere_probabilities(shape: tuple[int, int, int], centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """(2, z, y, x) mask and contour probabilities of (possibly overlapping) spheres."""
    grid = np.stack(np.mgrid[tuple(slice(0, s) for s in shape)]).astype(np.float32)
    ratio = np.stack(
        [np.sqrt(((grid - c[:, None, None, None]) ** 2).sum(0)) / r for c, r in zip(centres, radii, strict=True)]
    )
    nearest, owner = ratio.min(0), ratio.argmin(0)
    mask = np.clip((1.2 - nearest) / 0.4, 0, 1)
    interface = np.zeros(shape, bool)
    for axis in range(3):
        differ = np.diff(owner, axis=axis) != 0
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis], hi[axis] = slice(0, -1), slice(1, None)
        interface[tuple(lo)] |= differ
        interface[tuple(hi)] |= differ
    contour = ndimage.gaussian_filter(interface.astype(np.float32), 0.8)
    contour = np.maximum(contour / max(contour.max(), 1e-6), np.clip(nearest - 0.6, 0, 1))
    return np.stack([mask, np.clip(contour, 0, 1)]).astype(np.float32)


def multi_seed_components(probs: np.ndarray, connectivity: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Foreground components of the whole volume and, per component, its number of seed components."""
    _, seeds = watershed_oracle(probs, 0, connectivity)
    components = cc3d.connected_components(probs[0] > 0.8, connectivity=connectivity)
    seed_labels = cc3d.connected_components(seeds, connectivity=connectivity)
    pairs = np.unique(np.stack([components[seeds], seed_labels[seeds]], axis=1), axis=0)
    return components, np.bincount(pairs[:, 0], minlength=components.max() + 1)


def blocks_spanned(labels: np.ndarray, ids: np.ndarray, block) -> list[int]:
    """Number of blocks each listed object meets."""
    spans = []
    for i in ids.tolist():
        idx = np.argwhere(labels == i) // np.array(block)
        spans.append(len(np.unique(idx, axis=0)))
    return spans


WATERSHED_CASES = {
    "spheres": lambda: touching_sphere_probabilities(SHAPE, seed=11),
    "dense_spheres": lambda: touching_sphere_probabilities(SHAPE, seed=12, count=30),
}


@pytest.mark.parametrize("case", sorted(WATERSHED_CASES))
def test_watershed_equals_whole_volume_for_every_block_size(client, tmp_path, case):
    """Several seeds per foreground region, regions across block faces and corners: still exact."""
    probs = WATERSHED_CASES[case]()
    source = write_probs(str(tmp_path / "probs.zarr"), probs)
    whole, whole_result = run(client, tmp_path, source, WHOLE, name="whole", decode={"min_size": 8})
    oracle, _ = watershed_oracle(uint8_probs(probs), 8)
    assert same_up_to_renumbering(whole, oracle)
    assert whole_result.fixups == 0
    components, seed_count = multi_seed_components(uint8_probs(probs))
    shared = np.flatnonzero(seed_count >= 2)
    # the hard case is there: regions with several seeds that run through more than two blocks
    assert max(blocks_spanned(components, shared, BLOCKS[0])) > 2
    for block in BLOCKS:
        labels, result = run(client, tmp_path, source, block, decode={"min_size": 8})
        assert same_up_to_renumbering(labels, whole), block
        assert np.array_equal(np.unique(labels), np.arange(len(np.unique(whole))))  # consecutive IDs 1..N
        assert result.fixups > 0, block


def test_watershed_fixup_spans_a_block_corner(client, tmp_path):
    """Four touching spheres around the corner of eight blocks: one foreground region, four seeds, eight blocks."""
    centres = np.array([(6, 6, 6), (6, 10, 10), (10, 6, 10), (10, 10, 6)], np.float32) - 0.5
    probs = sphere_probabilities((16, 16, 16), centres, np.full(4, 4.5))
    source = write_probs(str(tmp_path / "probs.zarr"), probs)
    whole, _ = run(client, tmp_path, source, (16, 16, 16), name="whole", decode={"min_size": 0})
    assert len(np.unique(whole)) == 5
    assert len(np.unique(cc3d.connected_components(whole > 0, connectivity=6))) == 2
    for block in [(8, 8, 8), (4, 4, 8), (8, 4, 16)]:
        labels, result = run(client, tmp_path, source, block, decode={"min_size": 0})
        assert same_up_to_renumbering(labels, whole), block
        assert result.fixups == 1


def corner_fixup_job(client, tmp_path: Path) -> tuple[InstancesConfig, np.ndarray]:
    """Four touching spheres around the corner of eight 8^3 blocks (one fix-up): the job, and the labels of
    whole-volume decoding to compare its output with."""
    centres = np.array([(6, 6, 6), (6, 10, 10), (10, 6, 10), (10, 10, 6)], np.float32) - 0.5
    source = write_probs(str(tmp_path / "probs.zarr"), sphere_probabilities((16, 16, 16), centres, np.full(4, 4.5)))
    whole, _ = run(client, tmp_path, source, (16, 16, 16), name="whole", decode={"min_size": 0})
    cfg = InstancesConfig(
        input=source, output=str(tmp_path / "seg.zarr"), block_size=(8, 8, 8), decode={"min_size": 0}, viewing=False
    )
    return cfg, whole


def test_a_failing_fixup_is_reported_and_a_rerun_redoes_only_the_merge(client, tmp_path, monkeypatch):
    from pipeline.instances import tasks

    cfg, whole = corner_fixup_job(client, tmp_path)

    def broken(self, fixup):
        raise MemoryError("injected: the component's box does not fit")

    original = tasks.FixupTask.__call__
    monkeypatch.setattr(tasks.FixupTask, "__call__", broken)
    failed = run_instances(cfg, client, progress=False)
    assert not failed.ok and failed.relabel is None and failed.match.ok
    [failure] = failed.failures
    assert failure.unit == "fix-up of foreground component" and "MemoryError: injected" in failure.error
    assert failure.write_roi.count(",") == 4  # the component's box, OFFSET:SHAPE
    monkeypatch.setattr(tasks.FixupTask, "__call__", original)
    resumed = run_instances(cfg, client, progress=False)
    assert (
        resumed.ok and resumed.decode.skipped == resumed.decode.total and resumed.match.skipped == resumed.match.total
    )
    assert same_up_to_renumbering(read_labels(cfg.output), whole)


def test_a_rerun_after_a_failed_relabel_reuses_the_stored_fixups(client, tmp_path, monkeypatch):
    from pipeline.instances import tasks

    cfg, whole = corner_fixup_job(client, tmp_path)

    def broken(self, block):
        raise OSError("injected: the output store went away")

    def decoded_again(*args, **kwargs):
        raise AssertionError("the fix-up was decoded again although its labels were stored")

    with monkeypatch.context() as patch:
        patch.setattr(tasks.RelabelTask, "__call__", broken)
        failed = run_instances(cfg, client, progress=False)
    assert failed.fixups == 1 and not failed.relabel.ok
    monkeypatch.setattr(tasks, "decode_component", decoded_again)
    resumed = run_instances(cfg, client, progress=False)
    assert resumed.ok and resumed.fixups == 1
    assert same_up_to_renumbering(read_labels(cfg.output), whole)


def test_watershed_measurements_equal_whole_volume_measurements(client, tmp_path):
    import pyarrow.csv as pcsv

    probs = touching_sphere_probabilities(SHAPE, seed=11)
    offset = (3, 5, 7)
    source = write_probs(str(tmp_path / "probs.zarr"), probs, offset=offset)
    table_path = tmp_path / "objects.csv"
    decode = {"min_size": 8}
    whole, _ = run(client, tmp_path, source, WHOLE, name="whole", decode=decode)
    labels, result = run(client, tmp_path, source, (4, 12, 16), table=str(table_path), decode=decode)
    assert result.fixups > 0 and same_up_to_renumbering(labels, whole)
    got = pcsv.read_csv(table_path).to_pylist()
    want = {row["id"]: row for row in measure_labels(labels, VOXEL_NM, offset).to_pylist()}
    assert len(got) == result.num_objects == len(want) == len(np.unique(whole)) - 1
    for g in got:
        w = want[g["id"]]
        for key in g:
            assert g[key] == pytest.approx(w[key]), key


def test_watershed_keeps_touching_objects_apart_across_a_block_border(client, tmp_path):
    """Two touching mitochondria split by a contour plane at a block border stay two objects."""
    z, y, x = np.mgrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]].astype(np.float32)
    mask = np.zeros(SHAPE, np.float32)
    contour = np.zeros(SHAPE, np.float32)
    for cx in (8.0, 18.0):
        d = np.sqrt((z - 8) ** 2 + (y - 14) ** 2 + (x - cx) ** 2)
        mask = np.maximum(mask, np.clip(1.3 - d / 8, 0, 1))
    contour[:, :, 12:14] = 0.9  # the interface, beside the x = 16 block border of 8-voxel blocks
    source = write_probs(str(tmp_path / "probs.zarr"), np.stack([mask, contour]))
    whole, _ = run(client, tmp_path, source, WHOLE, name="whole", decode={"min_size": 0})
    blocks, _ = run(client, tmp_path, source, (8, 8, 8), decode={"min_size": 0})
    assert len(np.unique(whole)) == len(np.unique(blocks)) == 3
    assert np.array_equal(whole > 0, blocks > 0)


def test_measurements_equal_whole_volume_measurements(client, tmp_path):
    import pyarrow.csv as pcsv

    mask = noise_mask(SHAPE, seed=2)
    offset = (3, 5, 7)
    source = write_probs(str(tmp_path / "probs.zarr"), mask[None], offset=offset)
    table_path = tmp_path / "objects.csv"
    labels, result = run(
        client,
        tmp_path,
        source,
        (4, 12, 16),
        table=str(table_path),
        decode={"min_size": 2, "threshold": 0.62, "seed_threshold": 0.0},
    )
    got = pcsv.read_csv(table_path).to_pylist()
    want = measure_labels(labels, VOXEL_NM, offset).to_pylist()
    assert len(got) == result.num_objects == len(want) > 5
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for key in g:
            assert g[key] == pytest.approx(w[key]), key
    # spot-check one object against first principles
    first = got[0]
    zz, yy, xx = np.nonzero(labels == first["id"])
    assert first["voxels"] == len(zz)
    assert first["bbox_min_z"] == zz.min() + offset[0] and first["bbox_max_x"] == xx.max() + 1 + offset[2]
    assert first["centroid_y_nm"] == pytest.approx((yy.mean() + offset[1] + 0.5) * VOXEL_NM[1])
    assert first["volume_um3"] == pytest.approx(len(zz) * np.prod(VOXEL_NM) / 1e9)


def test_surface_area_counts_exposed_voxel_faces(client, tmp_path):
    import pyarrow.parquet as pq

    mask = np.zeros((12, 12, 20), np.float32)
    mask[2:10, 3:9, 5:15] = 1.0  # 8 x 6 x 10 box across block borders
    source = write_probs(str(tmp_path / "probs.zarr"), mask[None])
    table_path = tmp_path / "objects.parquet"
    run(client, tmp_path, source, (4, 4, 8), table=str(table_path), decode={"min_size": 0})
    (row,) = pq.read_table(table_path).to_pylist()
    vz, vy, vx = VOXEL_NM
    area_nm2 = 2 * (6 * 10 * vy * vx + 8 * 10 * vz * vx + 8 * 6 * vz * vy)
    assert row["surface_um2"] == pytest.approx(area_nm2 / 1e6)
    assert row["voxels"] == 8 * 6 * 10


def rods_and_dots(num_dots: int) -> tuple[np.ndarray, int]:
    """A (16, 32, 32) mask for 8x16x16 blocks: three rods across block faces (six pieces that touch a face between
    blocks) and `num_dots` one-voxel objects inside blocks, never on or beside a face; and the number of pieces."""
    mask = np.zeros((16, 32, 32), np.float32)
    mask[2:14, 4, 4] = mask[4, 2:30, 20] = mask[12, 24, 2:30] = 1.0  # across z = 8, y = 16 and x = 16
    dots = np.stack(np.meshgrid(*[np.arange(2, s, 4) for s in mask.shape], indexing="ij"), -1).reshape(-1, 3)
    mask[tuple(dots[:num_dots].T)] = 1.0
    return mask, 6


@pytest.mark.parametrize("num_dots", [0, 200])
def test_the_merge_holds_only_objects_that_touch_borders_between_blocks(client, tmp_path, num_dots):
    """However many objects lie inside blocks, the client merges the border pieces only, and each relabel task
    gets the final IDs of its own block's border pieces; every object is still labelled and in the table."""
    import pyarrow.parquet as pq

    mask, pieces = rods_and_dots(num_dots)
    source = write_probs(str(tmp_path / "probs.zarr"), mask[None])
    table = tmp_path / "objects.parquet"
    labels, result = run(
        client, tmp_path, source, (8, 16, 16), table=str(table), keep_scratch=True, decode={"min_size": 0}
    )
    assert result.border_objects == pieces
    assert result.num_objects == 3 + num_dots
    assert same_up_to_renumbering(labels, seeded_components(uint8_probs(mask[None])[0]))
    maps = sorted((tmp_path / "seg_8_16_16.zarr.mitoseg").rglob("map/*.npz"))
    assert len(maps) == 8 and sum(len(np.load(m)["labels"]) for m in maps) == pieces
    assert pq.read_table(table).to_pylist() == measure_labels(labels, VOXEL_NM).to_pylist()


def test_region_of_interest_and_precomputed_output(client, tmp_path):
    mask = noise_mask(SHAPE, seed=4)
    source = write_probs(str(tmp_path / "probs.zarr"), mask[None])
    output = f"precomputed://file://{tmp_path}/seg"
    roi = "4,4,8:8,20,16"
    cfg = InstancesConfig(
        input=source, output=output, block_size=(4, 8, 8), roi=roi, decode={"min_size": 0}, viewing=False
    )
    assert run_instances(cfg, client, progress=False).ok
    volume = open_volume(output)
    assert volume.meta.layer_type == "segmentation" and volume.meta.dtype == np.uint64
    assert volume.meta.voxel_size_nm == VOXEL_NM
    labels = volume.read(volume.meta.roi)[0]
    inside = (slice(4, 12), slice(4, 24), slice(8, 24))
    oracle = seeded_components(uint8_probs(mask[None])[0][inside])
    assert same_up_to_renumbering(labels[inside], oracle)
    outside = np.ones(SHAPE, bool)
    outside[inside] = False
    assert not labels[outside].any()


def test_threshold_comes_from_the_input_provenance(client, tmp_path):
    mask = noise_mask(SHAPE, seed=6)
    source = write_probs(str(tmp_path / "probs.zarr"), mask[None], threshold=0.7)
    labels, _ = run(client, tmp_path, source, (8, 8, 8), decode={"min_size": 0})
    assert np.array_equal(labels > 0, seeded_components(uint8_probs(mask[None])[0], threshold=0.7) > 0)


def test_resume_skips_done_blocks_and_gives_the_same_labels(client, tmp_path):
    mask = noise_mask(SHAPE, seed=7)
    source = write_probs(str(tmp_path / "probs.zarr"), mask[None])
    settings = {"decode": {"min_size": 0}, "keep_scratch": True}
    first, result = run(client, tmp_path, source, (8, 12, 16), name="seg", **settings)
    again, resumed = run(client, tmp_path, source, (8, 12, 16), name="seg", **settings)
    assert all(r.unchanged == r.total and r.completed == 0 for r in resumed.passes)  # a finished job: no stage runs
    assert np.array_equal(first, again)
    fresh, rerun = run(client, tmp_path, source, (8, 12, 16), name="seg", resume=False, decode={"min_size": 0})
    assert all(r.completed == r.total for r in rerun.passes)
    assert np.array_equal(first, fresh)
    assert not (tmp_path / "seg.zarr.mitoseg" / "instances").exists() or not any(
        (tmp_path / "seg.zarr.mitoseg" / "instances").iterdir()
    )


def test_a_failing_block_is_reported_and_nothing_is_relabelled(client, tmp_path, monkeypatch):
    from pipeline.instances import tasks

    mask = noise_mask(SHAPE, seed=8)
    source = write_probs(str(tmp_path / "probs.zarr"), mask[None])
    original = tasks.DecodeTask.__call__

    def flaky(self, block):
        if block.block_id[1] == 3:
            raise RuntimeError("injected failure")
        return original(self, block)

    monkeypatch.setattr(tasks.DecodeTask, "__call__", flaky)
    cfg = InstancesConfig(input=source, output=str(tmp_path / "seg.zarr"), block_size=(8, 12, 16), viewing=False)
    result = run_instances(cfg, client, progress=False)
    assert not result.ok and [f.block_id for f in result.failures] == [3]
    assert result.match is None and result.relabel is None
    monkeypatch.setattr(tasks.DecodeTask, "__call__", original)
    resumed = run_instances(cfg, client, progress=False)
    assert resumed.ok and resumed.decode.completed == 1 and resumed.decode.skipped == resumed.decode.total - 1


@pytest.mark.cluster
def test_two_process_workers_give_the_same_labels(tmp_path):
    from pipeline.cluster import dask_client
    from pipeline.config.cluster import LocalClusterConfig

    mask = noise_mask(SHAPE, seed=9)
    source = write_probs(str(tmp_path / "probs.zarr"), mask[None])
    oracle = seeded_components(uint8_probs(mask[None])[0])
    with dask_client(LocalClusterConfig(workers=2)) as process_client:
        labels, _ = run(process_client, tmp_path, source, (8, 12, 8), decode={"min_size": 0})
    assert same_up_to_renumbering(labels, oracle)
