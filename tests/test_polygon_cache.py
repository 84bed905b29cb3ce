"""The polygon mask cache (competition.data.polycache): bit-identical, invalidated, reused, safe to share."""
import json
import multiprocessing
import os

import cv2
import numpy as np
import pytest

from competition.config import CompetitionConfig
from competition.data import polycache
from competition.data import polygon_json as polygon_mod
from competition.data.adapters import make_adapter
from competition.data.base import DataError
from competition.data.cache import cache_root

CLASSES = ["a", "b", "c"]
H, W = 48, 70  # W not a multiple of 8: the packed rows end in a partial byte
N = 400  # a label file of ~40 KiB: over MIN_LABEL_BYTES, cached
ID = "S1/img"


def polygons(n: int, seed: int = 0) -> list[dict]:
    """``n`` small random polygons (3-7 vertices) inside the W x H image, over the three classes."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rng.integers(3, 8))
        c = rng.uniform((2, 2), (W - 2, H - 2))
        pts = c + rng.uniform(-3, 3, (k, 2))
        out.append({"label": CLASSES[int(rng.integers(0, 3))],
                    "points": np.clip(np.round(pts, 2), 0, (W, H)).tolist()})
    return out


def write_label(root, anns, image_id=ID):
    path = root / "train/outputs_json" / f"{image_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"annotations": anns}))
    return path


@pytest.fixture
def data(tmp_path, monkeypatch):
    """A polygon competition with one many-polygon image; the cwd is the project (runs/ lands there)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(polycache, "_unwritable", set())
    root = tmp_path / "data"
    (root / "train/DCM/S1").mkdir(parents=True)
    cv2.imwrite(str(root / "train/DCM/S1/img.png"), np.full((H, W), 90, np.uint8))
    assert write_label(root, polygons(N)).stat().st_size >= polycache.MIN_LABEL_BYTES
    return root


def adapter(root, classes=CLASSES):
    return make_adapter(CompetitionConfig(name="poly", data_root=str(root), format="polygon_json", classes=classes))


def uncached(ad, size=None):
    src = ad.image_size(ID)
    return polygon_mod.rasterize(ad.polygons(ID), src, size or src, len(ad.classes))


def cache_files() -> list:
    root = cache_root() / polycache.FOLDER
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file()) if root.is_dir() else []


@pytest.fixture
def count_rasterize(monkeypatch):
    calls = []
    real = polygon_mod.rasterize

    def counted(*args, **kw):
        calls.append(args[2])
        return real(*args, **kw)

    monkeypatch.setattr(polygon_mod, "rasterize", counted)
    return calls


@pytest.mark.parametrize("size", [None, (24, 35), (37, 53), (96, 140), (64, 64)])
def test_cached_mask_is_bit_identical_to_uncached(data, size):
    ad = adapter(data)
    want = uncached(ad, size)
    assert want.any() and want.shape[0] == 3
    first, second = ad.load_mask(ID, size), ad.load_mask(ID, size)  # a miss (written), then a hit
    third = adapter(data).load_mask(ID, size)  # another process: read from the file alone
    (f,) = cache_files()
    assert f.name.startswith(f"mask-{(size or (H, W))[0]}x{(size or (H, W))[1]}-")
    for got in (first, second, third):
        assert got.dtype == np.uint8 and got.shape == want.shape and got.flags.c_contiguous
        np.testing.assert_array_equal(got, want)


def test_second_read_does_not_rasterise(data, count_rasterize):
    ad = adapter(data)
    a = ad.load_mask(ID, (32, 40))
    assert count_rasterize == [(32, 40)]
    b = ad.load_mask(ID, (32, 40))
    c = adapter(data).load_mask(ID, (32, 40))  # a new run or fold: a fresh adapter, same file
    assert count_rasterize == [(32, 40)]
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    ad.load_mask(ID, (16, 20))  # another size is another mask
    ad.load_mask(ID, (16, 20))
    assert count_rasterize == [(32, 40), (16, 20)]
    assert len(cache_files()) == 2


def test_a_changed_label_file_invalidates_even_with_the_same_size_and_time(data, count_rasterize):
    ad = adapter(data)
    before = ad.load_mask(ID, (32, 40))
    label = data / "train/outputs_json" / f"{ID}.json"
    st = label.stat()
    anns = polygons(N)
    anns[0]["label"] = "b" if anns[0]["label"] != "b" else "c"  # one polygon relabelled: same file length
    label.write_text(json.dumps({"annotations": anns}))
    assert label.stat().st_size == st.st_size
    os.utime(label, ns=(st.st_atime_ns, st.st_mtime_ns))  # a copy that kept the old time stamp
    after = ad.load_mask(ID, (32, 40))
    assert len(count_rasterize) == 2
    np.testing.assert_array_equal(after, uncached(ad, (32, 40)))
    assert not np.array_equal(before, after)
    assert len(cache_files()) == 1  # the older key's file was removed


def test_an_invalid_label_is_never_served_from_the_cache(data):
    ad = adapter(data)
    ad.load_mask(ID, (32, 40))
    anns = polygons(N)
    anns[5]["label"] = "zz"
    write_label(data, anns)
    with pytest.raises(DataError, match="unknown label 'zz'"):
        ad.load_mask(ID, (32, 40))


def test_the_class_list_is_part_of_the_key(data):
    a = adapter(data).load_mask(ID, (32, 40))
    reordered = adapter(data, ["c", "b", "a"])
    b = reordered.load_mask(ID, (32, 40))
    np.testing.assert_array_equal(b, a[::-1])
    np.testing.assert_array_equal(b, uncached(reordered, (32, 40)))


@pytest.mark.parametrize("label_kib, channels, size, cached", [
    (32, 3, (256, 256), True), (31.9, 3, (256, 256), False),  # MIN_LABEL_BYTES
    (10, 29, (1024, 1024), False),  # the synthetic hand-bone: 29 bones in 10 KiB
    (170, 29, (1024, 1024), True), (170, 29, (2048, 2048), False),  # 3.6 vs 14.5 MiB packed: the ratio
    (455, 3, (768, 1024), True),  # 2,400 small polygons at their native size
])
def test_what_is_worth_caching(label_kib, channels, size, cached):
    assert polycache.PolygonMaskCache.worth_caching(int(label_kib * 1024), channels, size) is cached


def test_small_label_files_are_not_cached(data, count_rasterize):
    assert write_label(data, polygons(60)).stat().st_size < polycache.MIN_LABEL_BYTES
    ad = adapter(data)
    ad.load_mask(ID, (32, 40))
    ad.load_mask(ID, (32, 40))
    assert len(count_rasterize) == 2 and not (data.parent / "runs").exists()


def test_a_truncated_or_foreign_file_is_a_miss_and_is_rewritten(data):
    ad = adapter(data)
    want = ad.load_mask(ID, (32, 40))
    (rel,) = cache_files()
    path = cache_root() / polycache.FOLDER / rel
    whole = path.read_bytes()
    for bad in (whole[: len(whole) // 2], b"", None):
        if bad is None:
            np.save(path.with_suffix(""), np.zeros((3, 32, 5), np.uint16))  # right name and shape, wrong dtype
        else:
            path.write_bytes(bad)
        np.testing.assert_array_equal(ad.load_mask(ID, (32, 40)), want)
        assert path.read_bytes() == whole


def test_a_flipped_bit_is_a_miss_with_a_notice_and_is_rewritten(data, monkeypatch):
    """Right name, shape and length, one byte of the mask changed: the CRC-32 at the end of the file
    catches it, the mask is rasterised again (never served wrong) and the file written again."""
    from competition.data import cache as cache_mod
    monkeypatch.setattr(cache_mod, "_logged", set())
    said = []
    monkeypatch.setattr(polycache, "log_once", lambda msg, log=None: said.append(msg))
    ad = adapter(data)
    want = ad.load_mask(ID, (32, 40))
    (rel,) = cache_files()
    path = cache_root() / polycache.FOLDER / rel
    whole = path.read_bytes()
    bad = bytearray(whole)
    bad[len(bad) - 20] ^= 0x10  # inside the packed data, before the 4 CRC bytes
    path.write_bytes(bytes(bad))
    np.testing.assert_array_equal(ad.load_mask(ID, (32, 40)), want)
    assert said == [f"polygon mask cache: {path} fails its checksum; rasterising that mask again"]
    assert path.read_bytes() == whole


def test_an_unwritable_cache_is_skipped_with_one_message(data, monkeypatch, capsys):
    from competition.data import cache as cache_mod
    monkeypatch.setattr(cache_mod, "_logged", set())
    (data.parent / "runs").write_text("not a folder")
    ad = adapter(data)
    for _ in range(2):
        np.testing.assert_array_equal(ad.load_mask(ID, (32, 40)), uncached(ad, (32, 40)))
    out = capsys.readouterr().out
    assert out.count("polygon mask cache: not written") == 1


def _hammer(root, barrier, rounds: int) -> None:
    ad = adapter(root)
    cache, src, dst = ad._mask_cache, ad.image_size(ID), (32, 40)
    path = cache.path(ID, ad.label_path(ID).read_bytes(), src, dst)
    want = uncached(ad, dst)
    barrier.wait()
    for _ in range(rounds):
        cache.write(path, want)
        got = cache.read(path, dst)  # every read sees a complete file: some writer's, all identical
        if got is None or not np.array_equal(got, want):
            os._exit(3)
    os._exit(0)


def test_concurrent_writers_leave_one_valid_file(data):
    ctx = multiprocessing.get_context("fork")
    n = 4
    barrier = ctx.Barrier(n)
    procs = [ctx.Process(target=_hammer, args=(data, barrier, 25)) for _ in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * n
    (rel,) = cache_files()  # one file, no temp left behind
    ad = adapter(data)
    packed = np.load(cache_root() / polycache.FOLDER / rel)
    np.testing.assert_array_equal(packed, np.packbits(uncached(ad, (32, 40)), axis=-1))
    np.testing.assert_array_equal(ad.load_mask(ID, (32, 40)), uncached(ad, (32, 40)))


def test_dataloader_workers_fill_and_reuse_the_cache(data, count_rasterize):
    """Two worker processes fill the cache in the first pass; the parent then reads every mask back."""
    from torch.utils.data import DataLoader, Dataset

    class Masks(Dataset):
        def __init__(self, ad):
            self.ad = ad

        def __len__(self):
            return 4

        def __getitem__(self, i):
            return self.ad.load_mask(ID, (32, 40))

    ad = adapter(data)
    loader = DataLoader(Masks(ad), batch_size=1, num_workers=2, multiprocessing_context="fork")
    got = [b[0].numpy() for b in loader]
    assert count_rasterize == []  # the rasterising happened in the workers, not here
    for m in got:
        np.testing.assert_array_equal(m, uncached(ad, (32, 40)))
    count_rasterize.clear()
    ad.load_mask(ID, (32, 40))
    assert count_rasterize == []


def test_other_kinds_have_their_own_files(data, count_rasterize):
    """A second kind of mask of the same label file (e.g. a void region, one channel) is cached beside
    the class masks, under its own key."""
    ad = adapter(data)
    classes = ad.load_mask(ID, (32, 40))
    src, dst = ad.image_size(ID), (32, 40)

    def first_class():
        return polygon_mod.rasterize([p for p in ad.polygons(ID) if p[0] == 0], src, dst, 1)

    a = ad._mask_cache.load(ID, ad.label_path(ID), src, dst, first_class, kind="void", channels=1)
    b = ad._mask_cache.load(ID, ad.label_path(ID), src, dst, first_class, kind="void", channels=1)
    assert len(count_rasterize) == 2  # the class masks once, the other kind once
    np.testing.assert_array_equal(a, classes[:1])
    np.testing.assert_array_equal(b, classes[:1])
    assert sorted(f.name.split("-")[0] for f in cache_files()) == ["mask", "void"]
    np.testing.assert_array_equal(ad.load_mask(ID, (32, 40)), classes)
    with pytest.raises(ValueError, match="letters and digits"):
        ad._mask_cache.load(ID, ad.label_path(ID), src, dst, first_class, kind="../x", channels=1)
