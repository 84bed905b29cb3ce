"""data.cache: the memory-mapped sample cache gives exactly the uncached samples, is shared by folds,
filled from worker processes, rebuilt when stale, and skipped (with a message) when it cannot apply."""
import json
import os

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from competition.config import ExperimentConfig, load_competition
from competition.data import cache as cache_mod
from competition.data.adapters import make_adapter
from competition.data.dataset import SegDataset

AUG = {"train": [{"name": "Affine", "p": 1.0, "rotate": [-30, 30]}, {"name": "RandomBrightnessContrast", "p": 1.0},
                 {"name": "HorizontalFlip", "p": 0.5}],
       # random preprocessing too (CLAHE's clip limit and Sharpen's alpha are drawn): it stays per epoch
       "preprocess": [{"name": "CLAHE", "p": 1.0}, {"name": "Sharpen", "p": 0.5}]}


def exp(cache: bool, **kw) -> ExperimentConfig:
    base = {"name": "t", "competition": "tiny-hands",
            "data": {"input_size": 32, "batch_size": 2, "workers": 0, "cache": cache}}
    for k, v in kw.items():
        base[k] = {**base.get(k, {}), **v}
    return ExperimentConfig.model_validate(base)


@pytest.fixture(autouse=True)
def fresh_log(monkeypatch):
    monkeypatch.setattr(cache_mod, "_logged", set())


def folders(project):
    root = project / "runs" / "_cache"
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) if root.is_dir() else []


def same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
            assert torch.equal(a[k], b[k]), f"{k} differs"
        else:
            assert a[k] == b[k]


def ds_pair(ad, task, mode, **kw):
    return (SegDataset(ad, ad.ids, exp(False, **kw), task, mode), SegDataset(ad, ad.ids, exp(True, **kw), task, mode))


@pytest.mark.parametrize("task", ["multilabel", "multiclass"])
@pytest.mark.parametrize("mode, kw", [
    ("train", {}), ("train", {"augment": AUG}), ("val", {"augment": AUG}),
    ("train", {"augment": AUG, "model": {"output_scale": 2}}),
    ("train", {"augment": AUG, "data": {"policy": "crop", "crop_from": 48}}),
    ("val", {"data": {"policy": "crop"}}),  # native sizes, all equal here: cached at the native size
])
def test_cached_samples_are_bit_identical(tiny_project, task, mode, kw):
    ad = make_adapter(load_competition("tiny-hands"))
    plain, cached = ds_pair(ad, task, mode, **kw)
    assert cached.cache is not None
    for epoch in (0, 1, 2):  # epoch 0 fills the cache, later epochs read it
        plain.set_epoch(epoch), cached.set_epoch(epoch)
        for i in (0, 3, 7, 11):
            same(plain[i], cached[i])
    assert cached.cache.filled_count() == 4
    assert len(folders(tiny_project)) == 1


def test_rgb_and_16_bit_images_are_cached_exactly(project):
    import yaml

    from tests.conftest import tiny_competition
    for name, image in (("tiny-rgb", {"channels": "rgb", "bit_depth": 8}),
                        ("tiny-16", {"channels": "grayscale", "bit_depth": 16})):
        cfg = tiny_competition(name, subjects=4, size=40, image=image)
        (project / f"configs/competitions/{name}.yaml").write_text(yaml.safe_dump(cfg))
        ad = make_adapter(load_competition(name))
        e = {"competition": name, "augment": {"train": AUG["train"]}}  # CLAHE refuses these 16-bit images
        plain = SegDataset(ad, ad.ids, ExperimentConfig.model_validate({"name": "t", **e, "data": {"cache": False}}),
                           "multilabel", "train")
        cached = SegDataset(ad, ad.ids, ExperimentConfig.model_validate({"name": "t", **e, "data": {"cache": True}}),
                            "multilabel", "train")
        for epoch in (0, 1):
            plain.set_epoch(epoch), cached.set_epoch(epoch)
            for i in range(len(ad.ids)):
                same(plain[i], cached[i])
        dtype = np.uint16 if image["bit_depth"] == 16 else np.uint8
        assert cached.cache.image_dtype == dtype
        assert cached.cache.image_shape == ((128, 128, 3) if image["channels"] == "rgb" else (128, 128))


def test_folds_validation_and_oof_share_one_cache(tiny_project, monkeypatch):
    ad = make_adapter(load_competition("tiny-hands"))
    ids = ad.ids
    fold0_train = SegDataset(ad, ids[4:], exp(True, augment=AUG), "multilabel", "train")
    for i in range(len(fold0_train)):
        fold0_train[i]
    oof = SegDataset(ad, ids[:4], exp(True), "multilabel", "test")  # held-out prediction: images only
    for i in range(len(oof)):
        oof[i]
    (folder,) = folders(tiny_project)
    flags = np.load(tiny_project / "runs/_cache" / folder / "filled.npy")
    np.testing.assert_array_equal(flags[:, 0], 1)  # rows follow the adapter's full id list
    np.testing.assert_array_equal(flags[:, 1], [0] * 4 + [1] * 8)
    meta = json.loads((tiny_project / "runs/_cache" / folder / "meta.json").read_text())
    assert meta["ids"] == ids and folder.startswith("tiny-hands-train-32x32-")

    # Another fold, and validation: nothing is decoded or rasterised again where the cache has it.
    plain = SegDataset(ad, ids[2:10], exp(False), "multilabel", "val")
    expected = [plain[i] for i in range(len(plain))]
    decoded = []
    monkeypatch.setattr(ad, "load_image", lambda *a, **k: decoded.append(a) or pytest.fail("decoded again"))
    real_mask = type(ad).load_mask.__get__(ad)
    monkeypatch.setattr(ad, "load_mask", lambda i, size=None: decoded.append(i) or real_mask(i, size))
    val = SegDataset(ad, ids[2:10], exp(True), "multilabel", "val")
    for i in range(len(val)):
        same(expected[i], val[i])
    assert decoded == ids[2:4]  # only the masks the OOF pass did not need
    assert folders(tiny_project) == [folder]


def test_worker_processes_fill_the_cache(tiny_project):
    ad = make_adapter(load_competition("tiny-hands"))
    plain, cached = ds_pair(ad, "multilabel", "train", augment=AUG)
    for epoch in (0, 1):
        plain.set_epoch(epoch), cached.set_epoch(epoch)
        loader = DataLoader(cached, batch_size=3, num_workers=2)
        got = [s for batch in loader for s in _unbatch(batch)]
        for i, s in enumerate(got):
            same(plain[i], s)
    assert cached.cache._maps is None  # the parent never mapped the files: each worker did
    (folder,) = folders(tiny_project)
    flags = np.load(tiny_project / "runs/_cache" / folder / "filled.npy")
    assert flags.all()


def _unbatch(batch):
    n = len(batch["index"])
    return [{"image": batch["image"][k], "index": int(batch["index"][k]), "mask": batch["mask"][k]} for k in range(n)]


def test_a_stale_cache_is_rebuilt_and_the_old_one_removed(tiny_project):
    ad = make_adapter(load_competition("tiny-hands"))
    first = SegDataset(ad, ad.ids, exp(True), "multilabel", "val")
    first[0]
    (old,) = folders(tiny_project)
    # Another input size is another folder, kept.
    other = SegDataset(ad, ad.ids, exp(True, data={"input_size": 48}), "multilabel", "val")
    other[0]
    assert len(folders(tiny_project)) == 2
    # The data changes (a file rewritten): a new key, and the old folder of this size goes.
    png = ad.image_path(ad.ids[0])
    img = (255 - np.asarray(ad.load_image(ad.ids[0]))).astype(np.uint8)
    import cv2
    cv2.imwrite(str(png), img)
    st = os.stat(png)
    os.utime(png, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    ad = make_adapter(load_competition("tiny-hands"))
    plain, cached = ds_pair(ad, "multilabel", "val")
    same(plain[0], cached[0])
    names = folders(tiny_project)
    assert old not in names and len(names) == 2
    assert any(n.startswith("tiny-hands-train-48x48-") for n in names)


def test_an_unflagged_row_is_recomputed(tiny_project):
    """A process killed mid-write leaves data without its flag: the row is filled again."""
    ad = make_adapter(load_competition("tiny-hands"))
    plain, cached = ds_pair(ad, "multilabel", "val")
    cached[5]
    c = cached.cache
    a = c._arrays()
    a["images"].array[5] = 7  # garbage, as a half-written row
    a["filled"].array[5] = 0
    same(plain[5], cached[5])
    assert a["filled"].array[5].all()


def test_two_processes_building_the_same_folder(tiny_project):
    ad = make_adapter(load_competition("tiny-hands"))
    a = SegDataset(ad, ad.ids, exp(True), "multilabel", "val").cache
    b = SegDataset(ad, ad.ids, exp(True), "multilabel", "val").cache
    a._build()
    a.put_image(0, np.full(a.image_shape, 9, np.uint8))
    b._build()  # lost the race: uses the existing folder, its filled rows intact
    assert b.image(0) is not None and (b.image(0) == 9).all()
    assert not [p for p in (tiny_project / "runs/_cache").iterdir() if p.name.startswith(".")]


def test_crop_at_differing_native_sizes_skips_the_cache(tiny_project, monkeypatch, capsys):
    ad = make_adapter(load_competition("tiny-hands"))
    real = type(ad).image_size.__get__(ad)
    monkeypatch.setattr(ad, "image_size", lambda i, split="train": (60, 64) if i == ad.ids[0] else real(i, split))
    e = exp(True, data={"policy": "crop"})
    a = SegDataset(ad, ad.ids, e, "multilabel", "val")
    b = SegDataset(ad, ad.ids, e, "multilabel", "train")
    assert a.cache is None and b.cache is None
    out = capsys.readouterr().out
    assert out.count("data.cache: skipped") == 1 and "crop_from" in out
    a[1]
    assert folders(tiny_project) == []


def test_a_mask_the_cache_cannot_hold_falls_back(tiny_project, monkeypatch, capsys):
    ad = make_adapter(load_competition("tiny-hands"))
    real = type(ad).load_mask.__get__(ad)
    monkeypatch.setattr(ad, "load_mask", lambda i, size=None: real(i, size) * 255)  # not {0, 1}
    plain, cached = ds_pair(ad, "multilabel", "val")
    same(plain[2], cached[2])
    assert cached.cache is None and "does not fit its layout" in capsys.readouterr().out
    same(plain[3], cached[3])


def test_cache_off_writes_nothing(tiny_project):
    ad = make_adapter(load_competition("tiny-hands"))
    ds = SegDataset(ad, ad.ids, exp(False), "multilabel", "train")
    ds[0]
    assert ds.cache is None and not (tiny_project / "runs").exists()


def test_test_split_is_cached_images_only(tiny_project):
    ad = make_adapter(load_competition("tiny-hands"))
    e0, e1 = exp(False), exp(True)
    plain = SegDataset(ad, ad.test_ids, e0, "multilabel", "test", split="test")
    cached = SegDataset(ad, ad.test_ids, e1, "multilabel", "test", split="test")
    for _ in range(2):
        for i in range(len(plain)):
            same(plain[i], cached[i])
    (folder,) = folders(tiny_project)
    assert folder.startswith("tiny-hands-test-32x32-")
    assert not (tiny_project / "runs/_cache" / folder / "masks.npy").exists()


def test_a_cached_training_run_equals_an_uncached_one(tiny_project):
    """Train (2 epochs), validate and write the OOF with and without the cache: the same run."""
    import pandas as pd
    import yaml

    from competition.cli import main
    from competition.config import load_experiment
    from competition.train.loop import fit
    assert main(["folds", "--comp", "tiny-hands"]) == 0
    for name, cache in (("plain", False), ("cached", True)):
        data = {"competition": "tiny-hands", "model": {"arch": "Unet", "encoder": "resnet18"},
                "optimizer": {"name": "adamw", "lr": 0.003}, "scheduler": {"name": "cosine", "warmup_epochs": 0},
                "augment": {"train": AUG["train"]},
                "data": {"input_size": 64, "batch_size": 2, "workers": 0, "cache": cache},
                "train": {"epochs": 2, "progress": False, "seed": 0, "deterministic": True}}
        (tiny_project / f"configs/experiments/{name}.yaml").write_text(yaml.safe_dump(data))
        torch.manual_seed(0)
        fit(load_experiment(name), fold=0, log=lambda *_: None)
    runs = tiny_project / "runs"
    a, b = (pd.read_csv(runs / n / "fold0/history.csv") for n in ("plain", "cached"))
    assert a["val_dice"].tolist() == pytest.approx(b["val_dice"].tolist(), abs=1e-6)
    assert a["train_loss"].tolist() == pytest.approx(b["train_loss"].tolist(), abs=1e-6)
    from competition.store import tiles
    pa, pb = (tiles.open_store(runs / n / "fold0/oof") for n in ("plain", "cached"))
    assert pa.ids == pb.ids
    for i in range(len(pa)):
        np.testing.assert_array_equal(pa.image(i), pb.image(i))
    (folder,) = folders(tiny_project)
    assert np.load(runs / "_cache" / folder / "filled.npy").all()  # training + validation + OOF: every row


@pytest.mark.parametrize("width", [8, 37, 64])
def test_unpack_mask_writes_only_bounding_boxes_but_gives_the_full_mask(width, monkeypatch):
    rng = np.random.default_rng(0)
    m = np.zeros((5, 23, width), np.uint8)
    m[0] = rng.random((23, width)) > 0.5  # dense
    m[1, 3:9, 2:11] = 1  # a box
    m[2, 22, width - 1] = 1  # the last pixel (padding bits of the last byte stay 0)
    m[4, 0, 0] = 1  # class 3 empty
    for small in (1 << 30, 0):  # whole, and by bounding boxes
        monkeypatch.setattr(cache_mod, "_SMALL_MASK", small)
        got = cache_mod.unpack_mask(np.packbits(m, axis=-1), width)
        assert got.dtype == np.uint8 and got.flags.c_contiguous
        np.testing.assert_array_equal(got, m)


# --------------------------------------------------------------------------------------------- #
# Content checks: a row that fails its checksum is read from the data, a damaged folder is rebuilt
# --------------------------------------------------------------------------------------------- #
def cache_dir(project):
    (name,) = folders(project)
    return project / "runs" / "_cache" / name


def hidden(project):
    return [p.name for p in (project / "runs" / "_cache").iterdir() if p.name.startswith(".")]


def filled_dataset(ad, rows, mode="val", compact=False):
    """A cached dataset whose ``rows`` were read once (so filled), its mappings closed (the files are
    damaged next: a process must not touch a mapping of a truncated file)."""
    ds = SegDataset(ad, ad.ids, exp(True), "multilabel", mode)
    ds.compact = compact
    for i in rows:
        ds[i]
    ds.cache.close()
    return ds


@pytest.mark.parametrize("compact", [False, True])  # compact: image() + mask_bits() (passthrough)
@pytest.mark.parametrize("which, col", [("images.npy", 0), ("masks.npy", 1)])
def test_a_row_failing_its_checksum_is_read_from_the_data_and_refilled(tiny_project, capsys, which, col, compact):
    import zlib
    ad = make_adapter(load_competition("tiny-hands"))
    plain = SegDataset(ad, ad.ids, exp(False), "multilabel", "val")
    plain.compact = compact
    filled_dataset(ad, [3, 5], compact=compact)
    folder = cache_dir(tiny_project)
    arr = np.load(folder / which, mmap_mode="r+")
    good = np.array(arr[5])
    assert good.any()  # zeroing changes it
    arr[5] = 0  # flags and checksum intact: only the content is wrong
    arr.flush()
    del arr
    capsys.readouterr()

    fresh = SegDataset(ad, ad.ids, exp(True), "multilabel", "val")
    fresh.compact = compact
    assert fresh._passthrough() == compact
    same(plain[5], fresh[5])  # never the zeroed row
    same(plain[3], fresh[3])  # the sound row is used as it is
    out = capsys.readouterr().out
    what = "image" if col == 0 else "mask"
    assert out.count("failed its") == 1
    assert (f"data.cache: runs/_cache/{folder.name}: row for image {ad.ids[5]!r} failed its {what} checksum; "
            f"re-reading it from the data") in out
    # Stored anew: the right bytes, their checksum and the flag.
    fresh.cache.close()
    row = np.load(folder / which)[5]
    np.testing.assert_array_equal(row, good)
    assert np.load(folder / "sums.npy")[5, col] == zlib.crc32(good)
    assert np.load(folder / "filled.npy")[5].all()
    capsys.readouterr()
    again = SegDataset(ad, ad.ids, exp(True), "multilabel", "val")
    again.compact = compact
    same(plain[5], again[5])
    assert "failed its" not in capsys.readouterr().out


def test_a_truncated_images_file_is_rebuilt_once(tiny_project, capsys):
    ad = make_adapter(load_competition("tiny-hands"))
    plain = SegDataset(ad, ad.ids, exp(False), "multilabel", "val")
    filled_dataset(ad, [0, 1, 2])
    folder = cache_dir(tiny_project)
    images = folder / "images.npy"
    os.truncate(images, images.stat().st_size // 2)
    capsys.readouterr()

    second = SegDataset(ad, ad.ids, exp(True), "multilabel", "val")
    assert second.cache is not None
    for i in range(len(plain)):
        same(plain[i], second[i])
    out = capsys.readouterr().out
    notices = [line for line in out.splitlines() if "rebuilding" in line]
    assert len(notices) == 1 and "Traceback" not in out
    assert f"runs/_cache/{folder.name}/images.npy" in notices[0] and "(truncated)" in notices[0]
    assert folders(tiny_project) == [folder.name] and hidden(tiny_project) == []  # no damaged copy left

    # Rebuilt complete: the next dataset reuses it, every row filled, without a word about damage.
    second.cache.close()
    third = SegDataset(ad, ad.ids, exp(True), "multilabel", "val")
    out = capsys.readouterr().out
    assert f"reusing runs/_cache/{folder.name} ({len(ad.ids)} of {len(ad.ids)}" in out
    for i in (0, 6):
        same(plain[i], third[i])
    out += capsys.readouterr().out
    assert "rebuilding" not in out and "failed its" not in out and "without a cache" not in out


def _garbage_meta(folder):
    (folder / "meta.json").write_text("{not json")


def _other_ids_meta(folder):
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "ids": meta["ids"][::-1]}))


def _truncated_filled(folder):
    os.truncate(folder / "filled.npy", (folder / "filled.npy").stat().st_size - 10)


def _missing_sums(folder):
    (folder / "sums.npy").unlink()


def _fortran_masks(folder):
    masks = np.load(folder / "masks.npy")
    np.save(folder / "masks.npy", np.asfortranarray(masks))


def _bad_header(folder):
    with open(folder / "images.npy", "r+b") as f:
        f.seek(10)
        f.write(b"{'descr': <garbage")


def _wrong_shape(folder):
    np.save(folder / "filled.npy", np.zeros((3, 2), np.uint8))


def _no_meta(folder):
    (folder / "meta.json").unlink()


@pytest.mark.parametrize("damage, says", [
    (_garbage_meta, "meta.json: not a JSON cache index (JSONDecodeError"),
    (_other_ids_meta, "meta.json: the cache index does not match"),
    (_truncated_filled, "filled.npy: 142 bytes (truncated), expected 152"), (_missing_sums, "sums.npy: missing"),
    (_fortran_masks, "Fortran-ordered"), (_bad_header, "images.npy: the .npy header does not parse"),
    (_wrong_shape, "filled.npy: a uint8 (3, 2) C-ordered array, expected uint8 (12, 2)"),
    (_no_meta, "meta.json: missing"),
])
@pytest.mark.parametrize("when", ["before", "after"])  # damaged before the dataset opens it, or after
def test_a_damaged_folder_is_rebuilt_with_one_notice(tiny_project, capsys, damage, says, when):
    ad = make_adapter(load_competition("tiny-hands"))
    plain = SegDataset(ad, ad.ids, exp(False), "multilabel", "val")
    filled_dataset(ad, [0, 1])
    folder = cache_dir(tiny_project)
    capsys.readouterr()
    if when == "before":
        damage(folder)
    ds = SegDataset(ad, ad.ids, exp(True), "multilabel", "val")  # "after": found sound, opened lazily
    if when == "after":
        damage(folder)
    for i in (0, 1, 4):
        same(plain[i], ds[i])
    assert ds.cache is not None
    out = capsys.readouterr().out
    notices = [line for line in out.splitlines() if line.startswith("data.cache:")]
    assert len(notices) <= 2  # the rebuild, and (before) that the new folder is filled this epoch
    (notice,) = [line for line in notices if "rebuilding" in line]
    assert says in notice and f"rebuilding runs/_cache/{folder.name}" in notice
    assert folders(tiny_project) == [folder.name] and hidden(tiny_project) == []
    flags = np.load(folder / "filled.npy")
    np.testing.assert_array_equal(flags[:, 0], [1, 1, 0, 0, 1] + [0] * 7)  # a fresh folder: rows 0, 1, 4
    ds.cache.close()
    capsys.readouterr()
    again = SegDataset(ad, ad.ids, exp(True), "multilabel", "val")
    same(plain[4], again[4])
    assert "rebuilding" not in capsys.readouterr().out


def test_a_damaged_folder_that_cannot_be_moved_aside_loads_uncached(tiny_project, capsys, monkeypatch):
    """A read-only disk: no rebuild is possible, the run goes on without the cache."""
    ad = make_adapter(load_competition("tiny-hands"))
    plain = SegDataset(ad, ad.ids, exp(False), "multilabel", "val")
    filled_dataset(ad, [0])
    folder = cache_dir(tiny_project)
    ds = SegDataset(ad, ad.ids, exp(True), "multilabel", "val")
    _truncated_filled(folder)
    real = os.rename

    def read_only(src, dst, *a, **k):
        if ".damaged-" in str(dst):
            raise OSError(30, "Read-only file system")
        return real(src, dst, *a, **k)

    monkeypatch.setattr(cache_mod.os, "rename", read_only)
    capsys.readouterr()
    for i in (0, 1):
        same(plain[i], ds[i])
    assert ds.cache is None
    out = capsys.readouterr().out
    (notice,) = [line for line in out.splitlines() if line.startswith("data.cache:")]
    assert "filled.npy" in notice and "Read-only file system" in notice and "loading without a cache" in notice
    # A dataset made now skips the cache at once, with one line.
    again = SegDataset(ad, ad.ids, exp(True), "multilabel", "val")
    assert again.cache is None and "data.cache: not used" in capsys.readouterr().out
    same(plain[1], again[1])


def test_a_row_is_hashed_once_per_process(tiny_project, monkeypatch):
    ad = make_adapter(load_competition("tiny-hands"))
    calls = []
    real = cache_mod._crc32
    monkeypatch.setattr(cache_mod, "_crc32", lambda data: calls.append(1) or real(data))
    ds = SegDataset(ad, ad.ids, exp(True), "multilabel", "train")
    for epoch in range(3):
        ds.set_epoch(epoch)
        ds[2], ds[7]
        assert len(calls) == 4  # stored in epoch 0 (image and mask of two rows), then never hashed again
    ds.cache.close()
    fresh = SegDataset(ad, ad.ids, exp(True), "multilabel", "train")  # another process, as it were
    for epoch in range(3):
        fresh.set_epoch(epoch)
        fresh[2], fresh[7]
        assert len(calls) == 8  # checked on the first read only


def test_worker_processes_rebuild_a_folder_damaged_under_them(tiny_project, capsys):
    """Both workers find the truncated file: one moves the folder aside and rebuilds it, the other
    uses the rebuild; every sample is the uncached one, and the folder left behind is sound."""
    ad = make_adapter(load_competition("tiny-hands"))
    plain = SegDataset(ad, ad.ids, exp(False, augment=AUG), "multilabel", "train")
    filled_dataset(ad, range(len(ad.ids)))
    folder = cache_dir(tiny_project)
    cached = SegDataset(ad, ad.ids, exp(True, augment=AUG), "multilabel", "train")  # found sound here
    os.truncate(folder / "masks.npy", 1000)
    got = [s for batch in DataLoader(cached, batch_size=3, num_workers=2) for s in _unbatch(batch)]
    for i, s in enumerate(got):
        same(plain[i], s)
    assert folders(tiny_project) == [folder.name] and hidden(tiny_project) == []
    assert np.load(folder / "filled.npy").all()  # the workers filled the rebuild
    capsys.readouterr()
    plain_val, again = ds_pair(ad, "multilabel", "val")
    for i in (0, 11):
        same(plain_val[i], again[i])
    out = capsys.readouterr().out
    assert "rebuilding" not in out and "failed its" not in out and again.cache is not None
