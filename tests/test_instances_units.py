"""Pure pieces of the instance stage on tiny arrays with hand-computed or brute-force answers."""

from __future__ import annotations

import itertools

import cc3d
import numpy as np
import pytest
from daisy import Roi

from pipeline.config.instances import DecodeConfig
from pipeline.errors import GeometryError, StorageError
from pipeline.instances.decode import decode_block
from pipeline.instances.fixup import plan_fixups
from pipeline.instances.ids import block_of, check_id_space, id_stride, to_provisional
from pipeline.instances.matching import adjacent_pairs, face_contacts, low_faces
from pipeline.instances.measure import ObjectStats, TableWriter, block_stats, measure_labels, merge_stats, object_table
from pipeline.instances.merge import BorderObjects, interior_finals, merge_objects, split_block
from pipeline.instances.unionfind import UnionFind
from pipeline.plan import plan_blocks


def test_union_find_roots_are_smallest_ids_and_flagged_sets_stay_apart():
    uf = UnionFind()
    uf.flag(10)
    uf.flag(20)
    assert uf.union(30, 10)
    assert not uf.union(30, 20, keep_flagged_apart=True)  # both sides flagged
    assert uf.union(40, 30, keep_flagged_apart=True)  # 40 is unflagged
    assert uf.union(20, 50)
    assert uf.find(40) == 10 and uf.find(50) == 20 and uf.is_flagged(40)
    assert uf.union(50, 10)  # an unconstrained union may join flagged sets
    assert uf.roots(np.array([40, 50, 7], np.uint64)).tolist() == [10, 10, 7]
    assert len(uf) == 5


def test_provisional_ids_of_blocks_never_collide():
    stride = id_stride((2, 3, 4))
    local = np.array([[0, 1], [24, 3]], np.uint32)
    ids = to_provisional(local, 5, stride)
    assert ids.dtype == np.uint64 and ids.tolist() == [[0, 121], [144, 123]]
    assert block_of(ids[ids > 0], stride).tolist() == [5, 5, 5]
    with pytest.raises(GeometryError, match="2\\^63"):
        check_id_space(2**40, 2**30)


def test_low_faces_grow_only_along_later_axes_and_stay_in_the_region():
    region = Roi((0, 0, 0), (10, 10, 10))
    assert low_faces(Roi((0, 0, 0), (4, 4, 4)), region) == []
    faces = low_faces(Roi((4, 4, 4), (4, 4, 4)), region)
    assert [f.axis for f in faces] == [0, 1, 2]
    assert faces[0].own == Roi((4, 4, 4), (1, 4, 4)) and faces[0].other == Roi((3, 3, 3), (1, 6, 6))
    assert faces[1].own == Roi((4, 4, 4), (4, 1, 4)) and faces[1].other == Roi((4, 3, 3), (4, 1, 6))
    assert faces[2].own == Roi((4, 4, 4), (4, 4, 1)) and faces[2].other == Roi((4, 4, 3), (4, 4, 1))
    edge = low_faces(Roi((4, 8, 0), (4, 2, 4)), region)  # touches the high y border and the low x border
    assert [f.axis for f in edge] == [0, 1]
    assert edge[0].other == Roi((3, 7, 0), (1, 3, 5))


def _brute_force_cross_pairs(labels: np.ndarray, block: tuple[int, int, int], connectivity: int) -> list:
    """Every pair of adjacent non-zero voxels in different blocks, each once."""
    limit = {6: 1, 18: 2, 26: 3}[connectivity]
    offsets = [d for d in itertools.product((-1, 0, 1), repeat=3) if 0 < sum(map(abs, d)) <= limit and d > (0, 0, 0)]
    out = []
    for v in itertools.product(*(range(s) for s in labels.shape)):
        for d in offsets:
            w = tuple(a + b for a, b in zip(v, d, strict=True))
            if not all(0 <= c < s for c, s in zip(w, labels.shape, strict=True)):
                continue
            if [a // b for a, b in zip(v, block, strict=True)] == [a // b for a, b in zip(w, block, strict=True)]:
                continue
            if labels[v] and labels[w]:
                out.append(tuple(sorted((int(labels[v]), int(labels[w])))))
    return out


@pytest.mark.parametrize("connectivity", [6, 18, 26])
def test_face_pairs_are_every_cross_block_adjacency_exactly_once(connectivity):
    rng = np.random.default_rng(0)
    shape, block = (5, 6, 7), (2, 3, 4)
    labels = np.arange(1, np.prod(shape) + 1, dtype=np.uint64).reshape(shape)  # one ID per voxel
    labels[rng.random(shape) < 0.2] = 0
    plan = plan_blocks(shape, (1, 1, 1), block)
    found = []
    for b in plan.blocks():
        for face in low_faces(b.write_roi, plan.roi):
            own, other = labels[face.own.to_slices()], labels[face.other.to_slices()]
            found += [tuple(sorted(p)) for p in adjacent_pairs(face, own, other, connectivity).tolist()]
    expected = _brute_force_cross_pairs(labels, block, connectivity)
    assert sorted(found) == sorted(expected)
    assert len(set(found)) == len(found)


def test_pairs_respect_masks_and_contacts_count_background():
    face = low_faces(Roi((1, 0, 0), (1, 2, 2)), Roi((0, 0, 0), (2, 2, 2)))[0]
    other = np.array([[[5, 5], [0, 6]]], np.uint64)
    own = np.array([[[1, 0], [2, 2]]], np.uint64)
    assert adjacent_pairs(face, own, other, 6).tolist() == [[1, 5], [2, 6]]
    seeds_own = np.array([[[True, False], [False, True]]])
    seeds_other = np.ones((1, 2, 2), bool)
    assert adjacent_pairs(face, own, other, 6, seeds_own, seeds_other).tolist() == [[1, 5], [2, 6]]
    seeds_other[0, 1, 1] = False
    assert adjacent_pairs(face, own, other, 6, seeds_own, seeds_other).tolist() == [[1, 5]]
    contacts = face_contacts(face, own, other).tolist()
    assert contacts == [[0, 5, 0, 1], [1, 5, 0, 1], [2, 0, 0, 1], [2, 6, 0, 1]]


def test_components_decode_equals_cc3d_on_uint8_and_float():
    rng = np.random.default_rng(1)
    probs = rng.random((1, 6, 7, 8)).astype(np.float32)
    for connectivity in (6, 26):
        cfg = DecodeConfig(method="components", threshold=0.6, seed_threshold=0.0, connectivity=connectivity)
        decoded = decode_block(probs, cfg)
        assert decoded.num_seeded == decoded.num_labels == decoded.labels.max()
        assert np.array_equal(decoded.labels, cc3d.connected_components(probs[0] > 0.6, connectivity=connectivity))
    as_uint8 = np.round(probs * 255).astype(np.uint8)
    decoded = decode_block(as_uint8, DecodeConfig(method="components", threshold=0.6))
    assert np.array_equal(decoded.labels > 0, as_uint8[0] / np.float32(255) > 0.6)


def test_components_decode_numbers_seeded_components_first():
    mask = np.array([0.9, 0.6, 0.0, 0.6, 0.7, 0.0, 0.95, 0.0, 0.55], np.float32).reshape(1, 1, 1, 9)
    decoded = decode_block(mask, DecodeConfig(method="components", threshold=0.5, seed_threshold=0.85))
    # components {0, 1} and {6} hold a voxel > 0.85; {3, 4} and {8} do not and follow them
    assert decoded.num_labels == 4 and decoded.num_seeded == 2
    assert decoded.labels[0, 0].tolist() == [1, 1, 0, 3, 3, 0, 2, 0, 4]


def test_watershed_decode_labels_orphans_after_seeds():
    mask = np.zeros((1, 1, 9), np.float32)
    mask[0, 0, :] = [0.9, 0.95, 0.9, 0.0, 0.82, 0.83, 0.0, 0.9, 0.88]
    contour = np.zeros_like(mask)
    contour[0, 0, 8] = 0.9  # voxel 8 is no seed
    decoded = decode_block(np.stack([mask, contour]), DecodeConfig(method="watershed"))
    # seeds: voxels 0-2 (one component) and 7; voxels 4-5 are foreground without a seed
    assert decoded.num_seeded == 2 and decoded.num_labels == 3
    assert decoded.labels[0, 0].tolist() == [1, 1, 1, 0, 3, 3, 0, 2, 2]


def _naive_stats(labels: np.ndarray) -> dict[int, tuple]:
    out = {}
    for i in np.unique(labels[labels > 0]).tolist():
        idx = np.argwhere(labels == i)
        inside = np.pad(labels == i, 1)  # padding keeps np.roll from wrapping an object onto itself
        faces = [int((inside & ~np.roll(inside, s, axis=k)).sum()) for k in range(3) for s in (1, -1)]
        faces = [faces[0] + faces[1], faces[2] + faces[3], faces[4] + faces[5]]
        out[i] = (len(idx), idx.min(0).tolist(), (idx.max(0) + 1).tolist(), idx.sum(0).tolist(), faces)
    return out


def test_block_stats_equal_first_principles_and_halves_merge_exactly():
    rng = np.random.default_rng(2)
    labels = cc3d.connected_components(rng.random((6, 7, 8)) > 0.55, connectivity=6).astype(np.uint32)
    n = int(labels.max())
    whole = block_stats(labels, n, n, (0, 0, 0))
    for row, (voxels, lo, hi, total, faces) in _naive_stats(labels).items():
        i = row - 1
        assert whole.voxels[i] == voxels and whole.bbox_min[i].tolist() == lo and whole.bbox_max[i].tolist() == hi
        assert whole.coord_sum[i].tolist() == total and whole.faces[i].tolist() == faces
    # the same objects from two blocks split at x = 4, glued by their contacts
    left, right = labels[:, :, :4], labels[:, :, 4:]
    a = block_stats(left, n, n, (0, 0, 0), border_high=(True, True, False))
    b = block_stats(right, n, n, (0, 0, 4), border_low=(True, True, False))
    face = low_faces(Roi((0, 0, 4), (6, 7, 4)), Roi((0, 0, 0), (6, 7, 8)))[0]
    contacts = face_contacts(face, right[:, :, :1], left[:, :, -1:])
    both = ObjectStats.concat([a, b])
    present = both.voxels > 0
    parts = ObjectStats(**{name: getattr(both, name)[present] for name in ObjectStats.FIELDS})
    merged = merge_stats(parts, parts.ids, contacts, contacts[:, :2])
    for name in ("voxels", "bbox_min", "bbox_max", "coord_sum", "faces"):
        assert np.array_equal(getattr(merged, name), getattr(whole, name)), name


def test_measure_labels_of_a_box():
    labels = np.zeros((4, 5, 6), np.uint64)
    labels[1:3, 1:4, 2:6] = 2**40
    (row,) = measure_labels(labels, (10.0, 2.0, 2.0), (100, 0, 0)).to_pylist()
    assert row["id"] == 2**40 and row["voxels"] == 24
    assert row["volume_um3"] == pytest.approx(24 * 40 / 1e9)
    assert (row["bbox_min_z"], row["bbox_max_z"], row["bbox_max_x"]) == (101, 103, 6)
    assert row["centroid_z_nm"] == pytest.approx((2 + 100) * 10.0)  # mean index 1.5, centre +0.5
    assert row["surface_um2"] == pytest.approx(2 * (12 * 4 + 8 * 20 + 6 * 20) / 1e6)


def _stats(ids: list[int], seeded: list[bool], voxels: list[int]) -> ObjectStats:
    n = len(ids)
    return ObjectStats(
        np.array(ids, np.uint64),
        np.array(seeded),
        np.array(voxels, np.int64),
        np.zeros((n, 3), np.int64),
        np.ones((n, 3), np.int64),
        np.zeros((n, 3)),
        np.zeros((n, 3), np.int64),
    )


def _border(stats: ObjectStats, before: list[int] | None = None, interior: tuple[int, ...] = (0, 0)) -> BorderObjects:
    """Border objects of blocks of stride 10 (block b holds IDs 10 b + 1 .. 10 b + 10)."""
    below = np.zeros(len(stats), np.int64) if before is None else np.array(before, np.int64)
    return BorderObjects(stats, stats.ids.copy(), below, np.array(interior, np.int64))


NO_CONTACTS = np.zeros((0, 4), np.uint64)


def test_merge_attaches_orphans_keeps_seeds_apart_and_drops_small_or_unseeded():
    # block 0: seeded 1, 2; block 1 (ids from 11): seeded 11, orphan 12, orphan 13 (alone)
    stats = _stats([1, 2, 11, 12, 13], [True, True, True, False, False], [50, 50, 50, 5, 20])
    links = np.array([[11, 1]], np.uint64)  # same seed across the face
    touches = np.array([[11, 1], [12, 2], [12, 1], [11, 2]], np.uint64)
    merged = merge_objects(_border(stats), links, touches, NO_CONTACTS, min_size=10, stride=10)
    # 12 attaches to 1 (first in sorted order), 2 stays apart from 1 and 11, 13 has no seed: removed
    assert merged.row_final.tolist() == [1, 2, 1, 1, 0]
    assert merged.objects.voxels.tolist() == [105, 50]
    assert merged.equivalences == 4 and merged.num_objects == 2
    small = merge_objects(_border(stats), links, touches, NO_CONTACTS, min_size=60, stride=10)
    assert small.row_final.tolist() == [1, 0, 1, 1, 0]


def test_final_ids_follow_provisional_order_from_per_block_counts():
    """Final IDs number every kept object in provisional-ID order, while the merge sees border objects only.

    Block 0 holds border objects 1 and 3 and kept interior objects 2 and 4; block 1 border objects 11 (joined to
    1) and 15 with kept interior objects 12, 13, 14; block 2 one kept interior object.
    """
    stats = _stats([1, 3, 11, 15], [True] * 4, [9] * 4)
    border = _border(stats, before=[0, 1, 0, 3], interior=(2, 3, 1))
    merged = merge_objects(border, np.array([[11, 1]], np.uint64), np.zeros((0, 2), np.uint64), NO_CONTACTS, 0, 10)
    assert merged.first.tolist() == [0, 4, 8, 9] and merged.num_objects == 9
    assert merged.row_final.tolist() == [1, 3, 1, 8]
    assert merged.final_ids.tolist() == [1, 3, 8] and merged.objects.voxels.tolist() == [18, 9, 9]
    assert interior_finals(0, 4, merged.row_final[:2], 2).tolist() == [2, 4]
    assert interior_finals(4, 8, merged.row_final[2:], 3).tolist() == [5, 6, 7]
    assert interior_finals(8, 9, np.zeros(0, np.uint64), 1).tolist() == [9]
    with pytest.raises(StorageError, match="without resume"):
        interior_finals(0, 4, merged.row_final[:2], 3)


def test_split_block_keeps_only_objects_on_faces_between_blocks_for_the_merge():
    labels = np.zeros((4, 4, 4), np.uint32)
    labels[0, 0, 1] = 1  # on the low z and y faces (region borders here) and no other face
    labels[1, 1, 1] = 2  # inside
    labels[2, 2, 3] = 3  # on the high x face, between blocks
    labels[1, 2, 1:3] = 4  # inside, 2 voxels
    labels[3, 1, 1] = 5  # on the high z face, between blocks
    stats = block_stats(labels, 5, 4, (4, 0, 0))  # label 5 unseeded
    stats.ids += np.uint64(100)
    roi = Roi((4, 0, 0), (4, 4, 4))
    border, interior = split_block(stats, stats.ids, roi, (True, True, True), (False, True, False), min_size=2)
    assert border.stats.ids.tolist() == [103, 105] and border.interior.tolist() == [1]
    assert border.before.tolist() == [0, 1]  # the one kept interior object, 104, lies between them
    assert interior.ids.tolist() == [104]  # 101 and 102 are under min_size: removed in their block
    # watershed: a piece of a foreground component that reaches a face between blocks is border too
    components = np.array([101, 102, 103, 103, 105], np.uint64)
    border, interior = split_block(stats, components, roi, (True, True, True), (False, True, False), min_size=0)
    assert border.stats.ids.tolist() == [103, 104, 105] and border.components.tolist() == [103, 103, 105]
    assert interior.ids.tolist() == [101, 102] and border.before.tolist() == [2, 2, 2]


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_table_writer_in_batches_equals_the_table_in_one_piece(tmp_path, suffix):
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 6, (5, 6, 7)).astype(np.uint32)
    stats = block_stats(labels, 5, 5, (0, 0, 0))
    ids = np.arange(1, 6, dtype=np.uint64) * np.uint64(10)
    path = str(tmp_path / f"objects{suffix}")
    with TableWriter(path, (8.0, 4.0, 4.0), (1, 2, 3), rows_per_batch=2) as table:
        table.add(stats.select(np.array([1, 0])), ids[[1, 0]])
        table.add(stats.select(slice(2, 5)), ids[2:])
    got = pcsv.read_csv(path) if suffix == ".csv" else pq.read_table(path)
    assert got.to_pylist() == object_table(stats, ids, (8.0, 4.0, 4.0), (1, 2, 3)).to_pylist()
    empty = str(tmp_path / f"empty{suffix}")
    TableWriter(empty, (1, 1, 1), (0, 0, 0)).close()
    assert (pcsv.read_csv(empty) if suffix == ".csv" else pq.read_table(empty)).column_names[0] == "id"


def test_plan_fixups_lists_regions_crossing_blocks_with_several_seeds():
    # stride 100: block 0 holds 1, 2 (one foreground region, two seeds), block 1 holds 101 (seed, linked to 1),
    # 102 (orphan touching 2) and 103 (seeded, alone in its block); 201 in block 2 crosses into block 1 with one seed
    stats = _stats([1, 2, 101, 102, 103, 104, 201], [True, True, True, False, True, False, True], [9] * 7)
    stats.bbox_min[2] = [0, 0, 5]
    stats.bbox_max[1] = [3, 4, 2]
    components = np.array([1, 1, 101, 102, 103, 104, 201], np.uint64)
    links = np.array([[101, 1]], np.uint64)
    touches = np.array([[101, 1], [102, 2], [201, 104]], np.uint64)
    fixups, fixed = plan_fixups(stats, components, links, touches, stride=100)
    assert fixed.tolist() == [True, True, True, True, False, False, False]
    (fixup,) = fixups
    assert fixup.key == 1 and fixup.members.tolist() == [1, 2, 101, 102]
    assert (fixup.begin, fixup.end) == ((0, 0, 0), (3, 4, 2))
