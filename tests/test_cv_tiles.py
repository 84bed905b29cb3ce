"""The tiled probability store (competition.store.tiles) and the sparse ensemble passes (competition.cv.sparse):
round trips, every check of a damaged store, and each pass against a dense reference computed pixel by
pixel with the submission's own arithmetic."""
import json

import cv2
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from competition.cv import sparse
from competition.cv.blend import threshold_table
from competition.store import tiles
from competition.store.probs import blend


def _probs(rng, C: int, H: int, W: int) -> np.ndarray:
    """Mostly 0, a few all-255 regions, soft edges and noise: every tile kind appears."""
    p = np.zeros((C, H, W), np.uint8)
    for c in range(C):
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, H), rng.integers(0, W)
            cv2.circle(p[c], (int(x), int(y)), int(rng.integers(2, max(3, min(H, W) // 2))), 255, -1)
        p[c] = cv2.GaussianBlur(p[c], (0, 0), float(rng.uniform(0.5, 2.0)))
        if rng.random() < 0.5:
            k = rng.random((H, W)) < 0.01
            p[c][k] = rng.integers(0, 256, int(k.sum()))
    if C > 1:
        p[-1] = 255  # one class everywhere
    return p


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 70), st.integers(1, 70), st.sampled_from([4, 8, 16, 32]), st.integers(0, 99))
def test_split_and_assemble_round_trip(C, H, W, tile, seed):
    p = _probs(np.random.default_rng(seed), C, H, W)
    index, payload = tiles.split(p, tile)
    np.testing.assert_array_equal(tiles.assemble(index, payload, C, (H, W), tile), p)
    # Nothing all-0 is listed; all-255 tiles carry no payload; stored tiles are neither.
    assert len(payload) == int(index[:, 3].sum())
    ny, nx = tiles.grid((H, W), tile)
    assert (index[:, 1] < ny).all() and (index[:, 2] < nx).all()


def _store(tmp_path, rng, sizes, C=3, tile=16, name="s"):
    ids = [f"img{k}" for k in range(len(sizes))]
    probs = [_probs(rng, C, *hw) for hw in sizes]
    w = tiles.StoreWriter(tmp_path / name, ids, [f"c{c}" for c in range(C)], dict(zip(ids, sizes)),
                          {"task": "multilabel"}, tile=tile)
    for r in reversed(range(len(ids))):  # rows in any order
        w.add(r, probs[r])
    w.close()
    return tmp_path / name, probs


def test_store_round_trip_sizes_and_bytes(tmp_path):
    d, probs = _store(tmp_path, np.random.default_rng(0), [(40, 50), (33, 17), (64, 64)])
    s = tiles.open_store(d)
    assert len(s) == 3 and s.sizes == [(40, 50), (33, 17), (64, 64)]
    for i, p in enumerate(probs):
        np.testing.assert_array_equal(s.image(i), p)
    assert s.nbytes == (d / tiles.PAYLOAD).stat().st_size + s.index.nbytes
    assert s.nbytes < sum(p.nbytes for p in probs)
    assert oct(d.stat().st_mode & 0o777) != "0o700"  # teammates can read it
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_writer_refuses_wrong_shapes_and_an_incomplete_store(tmp_path):
    w = tiles.StoreWriter(tmp_path / "s", ["a", "b"], ["c0"], {"a": (8, 8), "b": (8, 8)}, {})
    with pytest.raises(ValueError, match=r"image 'a' must be uint8 \(1, 8, 8\)"):
        w.add(0, np.zeros((1, 8, 9), np.uint8))
    w.add(0, np.zeros((1, 8, 8), np.uint8))
    with pytest.raises(RuntimeError, match=r"incomplete: image\(s\) \['b'\]"):
        w.close()
    w.abort()
    assert not (tmp_path / "s").exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("damage, message", [
    ("truncate", "not a whole number of"),
    ("shorten", "out of range or out of order"),  # a whole tile missing: the index points past the end
    ("index_range", "out of range or out of order"),
    ("index_dtype", "expected int32"),
    ("ids", "no original size for id"),
    ("ids_short", "out of range or out of order"),  # one id fewer than the rows: the last rows point past it
    ("meta", "not valid JSON"),
    ("missing", "missing; the store is incomplete"),
    ("format", "not a version-2 'tiles' store"),
    # one byte of a tile changed, the length kept
    ("flip", "image 'img1' fails its checksum"),
    # ids.json edited: two images' tiles trade names
    ("swap", "image 'img1' fails its checksum"),
    ("sums", "sums.npy: expected uint32"),
])
def test_a_damaged_store_is_refused_naming_the_file(tmp_path, damage, message):
    d, _ = _store(tmp_path, np.random.default_rng(1), [(40, 50), (33, 17)])
    payload = d / tiles.PAYLOAD
    if damage == "truncate":
        payload.write_bytes(payload.read_bytes()[:-5])
    elif damage == "shorten":
        payload.write_bytes(payload.read_bytes()[:-16 * 16])
    elif damage == "index_range":
        idx = np.load(d / tiles.INDEX)
        idx[0, 1] = 99
        np.save(d / tiles.INDEX, idx)
    elif damage == "index_dtype":
        np.save(d / tiles.INDEX, np.load(d / tiles.INDEX).astype(np.float64))
    elif damage == "ids":
        (d / tiles.IDS).write_text(json.dumps(["img0", "other"]))
    elif damage == "ids_short":
        (d / tiles.IDS).write_text(json.dumps(["img0"]))
    elif damage == "meta":
        (d / tiles.META).write_text("{not json")
    elif damage == "missing":
        (d / tiles.INDEX).unlink()
    elif damage == "format":
        meta = json.loads((d / tiles.META).read_text())
        (d / tiles.META).write_text(json.dumps({**meta, "version": 99}))
    elif damage == "flip":
        s = tiles.open_store(d)
        last = int(s.index[s.offsets[1]:s.offsets[2], 4].max())  # a payload tile of the second image
        data = bytearray(payload.read_bytes())
        data[last * 16 * 16 + 7] ^= 0x01
        payload.write_bytes(bytes(data))
    elif damage == "swap":
        (d / tiles.IDS).write_text(json.dumps(["img1", "img0"]))
        meta = json.loads((d / tiles.META).read_text())
        sizes = meta["original_sizes"]
        (d / tiles.META).write_text(json.dumps(
            {**meta, "original_sizes": {"img0": sizes["img1"], "img1": sizes["img0"]}}))
    elif damage == "sums":
        np.save(d / tiles.SUMS, np.zeros(5, np.int64))
    with pytest.raises(tiles.StoreError, match=message) as e:
        s = tiles.open_store(d)
        for i in range(len(s)):
            s.image(i)
    assert str(d) in str(e.value) and "predict it again" in str(e.value)


def test_a_dense_store_of_an_earlier_version_is_refused(tmp_path):
    d = tmp_path / "oof"
    d.mkdir()
    np.save(d / "probs.npy", np.zeros((2, 3, 8, 8), np.uint8))
    with pytest.raises(tiles.StoreError, match=r"a dense store \(probs.npy\) from an earlier version"):
        tiles.open_store(d)


def test_free_space_is_checked_before_writing(tmp_path, monkeypatch):
    import shutil

    from competition.config import ConfigError
    need = tiles.estimate_sizes([(2048, 2048)] * 160, 29)
    assert 1.5e9 < need < 3e9  # one hand-bone fold at 10 % of its dense 19.5 GB
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12 - 10**9, 10**9))
    with pytest.raises(ConfigError, match=r"needs about 2\.\d+ GB .* has 1\.00 GB free.*run `competition oof`"):
        tiles.check_space(tmp_path / "runs/e/fold0/oof", need, "the OOF of e fold 0", "competition oof")


def test_clean_stale_removes_only_the_writers_temp_folders(tmp_path):
    w = tiles.StoreWriter(tmp_path / "oof", ["a"], ["c"], {"a": (4, 4)}, {})  # killed: never closed
    (tmp_path / ".mine.tmp").mkdir()  # not a writer's name
    removed = tiles.clean_stale(tmp_path)
    assert removed == [w.tmp] and (tmp_path / ".mine.tmp").is_dir()


# --------------------------------------------------------------------------------------------- #
# The sparse passes against a dense reference
# --------------------------------------------------------------------------------------------- #
def _case(seed: int, M: int = 3, C: int = 3, H: int = 45, W: int = 38, tile: int = 8, ignore: bool = False):
    rng = np.random.default_rng(seed)
    members = [_probs(rng, C, H, W) for _ in range(M)]
    members[1][0] = members[0][0]  # a class where two members agree exactly
    truth = np.stack([cv2.GaussianBlur(members[0][c], (0, 0), 1.0) > 100 for c in range(C)])
    truth[1, :5, :] = True  # truth where no member predicts
    ign = None
    if ignore:
        ign = np.zeros((H, W), bool)
        ign[10:20, 5:30] = True
        truth[:, ign] = False  # the truth has no class in the void
    split = [tiles.split(m, tile) for m in members]
    tsplit = tiles.split(truth.view(np.uint8) * np.uint8(255), tile)
    sm = [tiles.SparseImage(i, p, (H, W), tile) for i, p in split]
    stk = sparse.stack(sm, tiles.SparseImage(*tsplit, (H, W), tile), C, ign)
    keep = np.ones((H, W), bool) if ign is None else ~ign
    return members, truth, keep, stk


def _weights(rng, M: int, C: int) -> np.ndarray:
    w = rng.random((M, C)) + 0.1
    return (w / w.sum(0, keepdims=True)).astype(np.float32)


def _dense_levels(members, w):
    p = blend([torch.from_numpy(m) for m in members], torch.from_numpy(w)).numpy()
    return sparse.levels_of(p.reshape(-1), threshold_table()).reshape(p.shape), p


@pytest.mark.parametrize("seed, ignore", [(0, False), (1, False), (2, True), (3, True)])
def test_histograms_equal_the_dense_blend_pixel_by_pixel(seed, ignore):
    members, truth, keep, stk = _case(seed, ignore=ignore)
    rng = np.random.default_rng(seed + 100)
    ws = [_weights(rng, 3, 3), np.full((3, 3), 1 / 3, np.float32), np.eye(3, dtype=np.float32)[:, [0, 0, 0]]]
    got = sparse.histograms(stk, ws, threshold_table())
    for j, w in enumerate(ws):
        lev, _ = _dense_levels(members, w)
        for c in range(3):
            want = np.zeros((256, 2), np.int64)
            np.add.at(want, (lev[c][keep], truth[c][keep].astype(np.int64)), 1)
            np.testing.assert_array_equal(got[j, c], want, err_msg=f"blend {j} class {c}")
    np.testing.assert_array_equal(stk.truth_sum, truth[:, keep].sum(1))


@pytest.mark.parametrize("seed, ignore", [(0, False), (4, True)])
def test_components_equal_dense_labelling(seed, ignore):
    members, truth, keep, stk = _case(seed, ignore=ignore)
    rng = np.random.default_rng(seed)
    w = _weights(rng, 3, 3)
    levels = np.array([128, 60, 200])
    got = sparse.components(stk, [(w, levels)], threshold_table())[0]
    _, p = _dense_levels(members, w)
    for c in range(3):
        mask = (p[c] >= np.float32((levels[c] - 0.5) / 255)).astype(np.uint8)  # the submission's compare
        n, lab, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        want = sorted(zip(stats[1:, cv2.CC_STAT_AREA].tolist(),
                          np.bincount(lab[truth[c]], minlength=n)[1:].tolist(),
                          np.bincount(lab[keep], minlength=n)[1:].tolist()))
        assert sorted(zip(*(a.tolist() for a in got[c]))) == want, f"class {c}"


@pytest.mark.parametrize("seed, ignore", [(0, False), (5, True)])
def test_search_part_counts_certain_pixels_and_keeps_the_uncertain(seed, ignore):
    members, truth, keep, stk = _case(seed, ignore=ignore)
    hi = 128
    vals, counts, inter0, pred0, tsum = sparse.search_part(stk, hi)
    ge = np.stack([m >= hi for m in members])
    all_ge, any_ge = ge.all(0) & keep, ge.any(0) & keep
    unc = any_ge & ~all_ge
    np.testing.assert_array_equal(pred0, all_ge.reshape(3, -1).sum(1))
    np.testing.assert_array_equal(inter0, (all_ge & truth).reshape(3, -1).sum(1))
    np.testing.assert_array_equal(counts[:, 0], (unc & truth).reshape(3, -1).sum(1))
    np.testing.assert_array_equal(counts[:, 1], (unc & ~truth).reshape(3, -1).sum(1))
    # The kept values are the members' values at those pixels, class by class, truth 1 first.
    at = 0
    for c in range(3):
        for t in (True, False):
            sel = unc[c] & (truth[c] == t)
            want = sorted(map(tuple, np.stack([m[c][sel] for m in members], 1).tolist()))
            n = int(sel.sum())
            assert sorted(map(tuple, vals[:, at:at + n].T.tolist())) == want
            at += n
    assert at == vals.shape[1]


def test_writer_on_threads_writes_the_same_store(tmp_path):
    rng = np.random.default_rng(7)
    ids = [f"i{k}" for k in range(7)]
    probs = [_probs(rng, 3, 40 + k, 33) for k in range(7)]
    for workers in (1, 3):
        w = tiles.StoreWriter(tmp_path / f"w{workers}", ids, ["a", "b", "c"],
                              {i: p.shape[1:] for i, p in zip(ids, probs)}, {}, tile=16, workers=workers)
        for r in (3, 0, 6, 1, 2, 5, 4):
            w.add(r, probs[r])
        w.close()
    for name in (tiles.INDEX, tiles.PAYLOAD, tiles.IDS):
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w3" / name).read_bytes(), name
