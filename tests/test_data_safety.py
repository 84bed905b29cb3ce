"""Data safety: synthetic generation never deletes or overwrites anyone's files and survives SIGKILL;
symlinked images, labels, masks and sub-folders must stay inside the data root, in every layout."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import tiny_competition

import competition.data.mask_folders  # noqa: F401  registers "mask_folders"
import competition.data.rle_csv  # noqa: F401  registers "rle_csv"
from competition.config import CompetitionConfig
from competition.data import synthetic
from competition.data.adapters import make_adapter
from competition.data.base import DataError
from competition.data.synthetic import ensure_generated

REPO = Path(__file__).resolve().parent.parent
MARKER = ".generated"


# --------------------------------------------------------------------------------------------- #
# Synthetic generation
# --------------------------------------------------------------------------------------------- #
def synth_cfg(root: Path, **spec) -> CompetitionConfig:
    base = tiny_competition(data_root=str(root))
    base["synthetic"] = {"subjects": 4, "test_subjects": 1, "images_per_subject": 1, "size": 32, "seed": 0, **spec}
    return CompetitionConfig.model_validate(base)


def snapshot(root: Path) -> dict[str, str]:
    """Relative path -> content hash of every file under ``root``, hidden ones included."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def data_files(root: Path) -> dict[str, str]:
    """The snapshot without our own bookkeeping (marker, lock)."""
    return {k: v for k, v in snapshot(root).items() if not k.startswith(".generated")}


def marker(root: Path) -> dict:
    return json.loads((root / MARKER).read_text())


@pytest.fixture
def user_data(tmp_path) -> Path:
    """A folder of someone's real data, as a copied competition YAML's data_root would point to."""
    root = tmp_path / "real"
    (root / "train/DCM/P1").mkdir(parents=True)
    (root / "train/DCM/P1/scan.png").write_bytes(b"precious")
    (root / "train.csv").write_text("id,rle\n")
    return root


def test_refuses_a_folder_with_someone_elses_files(user_data):
    before = snapshot(user_data)
    with pytest.raises(DataError) as e:
        make_adapter(synth_cfg(user_data))
    msg = str(e.value)
    assert str(user_data) in msg and "train, train.csv" in msg
    assert "remove the `synthetic:` section" in msg and "empty folder" in msg
    assert snapshot(user_data) == before and sorted(os.listdir(user_data)) == ["train", "train.csv"]


def test_refuses_even_a_single_hidden_file_and_a_data_root_that_is_a_file(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    (root / ".env").write_text("SECRET=1")
    with pytest.raises(DataError, match=r"\.env"):
        ensure_generated(synth_cfg(root))
    assert os.listdir(root) == [".env"]
    (tmp_path / "f").write_text("x")
    with pytest.raises(DataError, match="data_root is a file"):
        ensure_generated(synth_cfg(tmp_path / "f"))


@pytest.mark.parametrize("exists", [False, True])
def test_generates_into_an_absent_or_empty_folder(tmp_path, exists):
    root = tmp_path / "gen"
    if exists:
        root.mkdir()
    cfg = synth_cfg(root)
    ensure_generated(cfg)
    m = marker(root)
    assert m["complete"] and sorted(data_files(root)) == m["files"]
    assert "train/DCM/ID000/image00000_L.png" in m["files"] and "test_truth.csv" in m["files"]
    assert not [n for n in os.listdir(root) if n.startswith(".generating")]
    assert len(make_adapter(cfg).ids) == 4
    before = snapshot(root)
    ensure_generated(cfg)  # complete and current: nothing is rewritten
    assert snapshot(root) == before


def test_regenerating_replaces_only_our_files(tmp_path):
    root = tmp_path / "gen"
    ensure_generated(synth_cfg(root, subjects=6))
    (root / "notes.txt").write_text("mine")
    (root / "train/DCM/ID005/mine.txt").write_text("also mine")  # inside a folder we will empty
    ensure_generated(synth_cfg(root, subjects=4, seed=3))
    files = data_files(root)
    assert files["notes.txt"] and files["train/DCM/ID005/mine.txt"]  # untouched
    assert not (root / "train/DCM/ID004").exists()  # ours only: removed with its now-empty folder
    assert not (root / "train/outputs_json/ID005").exists()
    assert marker(root)["complete"] and marker(root)["stamp"]["synthetic"]["seed"] == 3
    fresh = tmp_path / "fresh"
    ensure_generated(synth_cfg(fresh, subjects=4, seed=3))
    assert {k: v for k, v in files.items() if "mine" not in k and k != "notes.txt"} == data_files(fresh)


def test_regenerating_refuses_to_overwrite_a_file_it_did_not_write(tmp_path):
    root = tmp_path / "gen"
    ensure_generated(synth_cfg(root))
    (root / "train/DCM/ID004").mkdir()
    (root / "train/DCM/ID004/image00004_L.png").write_bytes(b"someone's")  # where subject 5 will go
    before = snapshot(root)
    with pytest.raises(DataError, match=r"would overwrite file\(s\) it did not generate: "
                                        r"train/DCM/ID004/image00004_L\.png.*Nothing was changed"):
        ensure_generated(synth_cfg(root, subjects=5))
    assert snapshot(root) == before


def test_marker_of_the_earlier_format_is_honoured(tmp_path, monkeypatch):
    """Folders generated before markers listed their files: the file list is rebuilt from the spec."""
    root = tmp_path / "gen"
    cfg = synth_cfg(root, subjects=5)
    ensure_generated(cfg)
    (root / MARKER).write_text(json.dumps({"synthetic": cfg.synthetic.model_dump(), "classes": cfg.classes},
                                          sort_keys=True))
    (root / "mine.txt").write_text("x")
    monkeypatch.setattr(synthetic, "generate", lambda *a: pytest.fail("regenerated a current folder"))
    ensure_generated(cfg)
    monkeypatch.undo()
    ensure_generated(synth_cfg(root, subjects=4))
    assert (root / "mine.txt").exists() and not (root / "train/DCM/ID004").exists()
    assert marker(root)["complete"]


_KILLER = """
import json, os, signal, sys
import competition.data.synthetic as syn
from competition.config import CompetitionConfig
cfg = CompetitionConfig.model_validate(json.loads(sys.argv[1]))
where, after = sys.argv[2], int(sys.argv[3])
calls = [0]
def kill_soon():
    calls[0] += 1
    if calls[0] > after:
        os.kill(os.getpid(), signal.SIGKILL)
if where == "generate":
    write = syn._write_image
    def _write_image(*a, **k):
        kill_soon()
        return write(*a, **k)
    syn._write_image = _write_image
else:  # while files are moved into the data root
    replace = os.replace
    def _replace(src, dst):
        if ".generating." in str(src) and ".generating." not in str(dst):
            kill_soon()
        return replace(src, dst)
    os.replace = _replace
syn.ensure_generated(cfg)
"""


def run_killed(cfg: CompetitionConfig, where: str, after: int) -> None:
    p = subprocess.run([sys.executable, "-c", _KILLER, cfg.model_dump_json(), where, str(after)],
                       cwd=REPO, capture_output=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr.decode()


def looks_complete(root: Path) -> bool:
    return (root / MARKER).is_file() and marker(root)["complete"]


@pytest.mark.parametrize("where, after", [("generate", 2), ("install", 3)])
def test_sigkill_on_first_generation_never_leaves_a_complete_looking_folder(tmp_path, where, after):
    root = tmp_path / "gen"
    cfg = synth_cfg(root)
    run_killed(cfg, where, after)
    assert not looks_complete(root)
    ensure_generated(cfg)  # the leftovers are ours: the next run finishes the job
    assert looks_complete(root) and not [n for n in os.listdir(root) if n.startswith(".generating")]
    ensure_generated(synth_cfg(tmp_path / "fresh"))
    assert data_files(root) == data_files(tmp_path / "fresh")


def test_sigkill_while_regenerating_keeps_user_files_and_recovers(tmp_path):
    root = tmp_path / "gen"
    ensure_generated(synth_cfg(root, subjects=6))
    (root / "notes.txt").write_text("mine")
    new = synth_cfg(root, subjects=4, seed=1)
    run_killed(new, "install", 4)
    assert not looks_complete(root) and (root / "notes.txt").read_text() == "mine"
    ensure_generated(new)
    assert looks_complete(root) and (root / "notes.txt").read_text() == "mine"
    ensure_generated(synth_cfg(tmp_path / "fresh", subjects=4, seed=1))
    assert {k: v for k, v in data_files(root).items() if k != "notes.txt"} == data_files(tmp_path / "fresh")


def test_leftover_temp_of_a_killed_marker_write_is_ours(tmp_path):
    root = tmp_path / "gen"
    root.mkdir()
    (root / "..generated.k3x9_a2b.tmp").write_text("{")  # what a kill inside atomic_write_text leaves
    ensure_generated(synth_cfg(root))
    assert looks_complete(root) and not (root / "..generated.k3x9_a2b.tmp").exists()
    (root / ".other.k3x9_a2b.tmp").write_text("")  # not our marker's temp: left alone
    ensure_generated(synth_cfg(root, seed=4))
    assert (root / ".other.k3x9_a2b.tmp").exists()


def test_regenerating_never_reaches_through_a_symlinked_folder(tmp_path, user_data):
    root = tmp_path / "gen"
    ensure_generated(synth_cfg(root))
    shutil.rmtree(root / "train/DCM")
    (root / "train/DCM").symlink_to(user_data / "train/DCM")  # someone linked their real images here
    before = snapshot(user_data)
    with pytest.raises(DataError, match=r"train/DCM/ID000: links out of the data root .*Nothing was changed"):
        ensure_generated(synth_cfg(root, seed=9))
    assert snapshot(user_data) == before


def test_two_processes_generating_at_once_both_succeed(tmp_path):
    root = tmp_path / "gen"
    cfg = synth_cfg(root)
    code = ("import sys; from competition.config import CompetitionConfig; from competition.data.synthetic "
            "import ensure_generated; ensure_generated(CompetitionConfig.model_validate_json(sys.argv[1]))")
    procs = [subprocess.Popen([sys.executable, "-c", code, cfg.model_dump_json()], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1].decode() for o in outs]
    assert sum(b"generating" in o[0] for o in outs) == 1  # the second waited and found it done
    ensure_generated(synth_cfg(tmp_path / "fresh"))
    assert looks_complete(root) and data_files(root) == data_files(tmp_path / "fresh")


def test_copied_yaml_with_synthetic_section_cannot_delete_real_data(tmp_path, monkeypatch, user_data):
    """The original bug: a copied YAML pointing data_root at real data used to rmtree it."""
    (tmp_path / "configs/competitions").mkdir(parents=True)
    comp = tiny_competition(name="real", data_root=str(user_data))
    (tmp_path / "configs/competitions/real.yaml").write_text(yaml.safe_dump(comp))
    monkeypatch.chdir(tmp_path)
    from competition.config import load_competition
    before = snapshot(user_data)
    with pytest.raises(DataError, match="refusing to generate"):
        make_adapter(load_competition("real"))
    assert snapshot(user_data) == before


# --------------------------------------------------------------------------------------------- #
# Symlinks, every layout
# --------------------------------------------------------------------------------------------- #
def png(path: Path, shape=(20, 30), value=90) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full(shape, value, np.uint8))
    return path


def link(path: Path, target: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target, target_is_directory=target.is_dir())
    return path


@pytest.fixture
def outside(tmp_path) -> Path:
    """Files outside every data root: what a symlink must not smuggle in."""
    o = tmp_path / "outside"
    png(o / "ID7" / "x.png")
    png(o / "stray.png")
    (o / "x.json").write_text(json.dumps({"annotations": []}))
    (o / "labels").mkdir()
    (o / "labels" / "a.json").write_text(json.dumps({"annotations": []}))
    return o


def escapes(path_part: str, root: Path):
    return pytest.raises(DataError, match=rf"{path_part}.*outside the data root {root.resolve()}")


# -- polygon_json ------------------------------------------------------------------------------
def poly_root(tmp_path) -> Path:
    root = tmp_path / "poly"
    for subject, stem in (("ID1", "a"), ("ID2", "b")):
        png(root / "train/DCM" / subject / f"{stem}.png")
        lab = root / "train/outputs_json" / subject / f"{stem}.json"
        lab.parent.mkdir(parents=True, exist_ok=True)
        lab.write_text(json.dumps({"annotations": [{"label": "a", "points": [[1, 1], [5, 1], [5, 5]]}]}))
    return root


def poly_cfg(root: Path) -> CompetitionConfig:
    return CompetitionConfig(name="poly", data_root=str(root), format="polygon_json", classes=["a"])


def test_polygon_image_symlink_outside_is_refused_inside_is_allowed(tmp_path, outside):
    root = poly_root(tmp_path)
    inside = link(root / "train/DCM/ID1/c.png", root / "train/DCM/ID2/b.png")
    (root / "train/outputs_json/ID1/c.json").write_text(json.dumps({"annotations": []}))
    ad = make_adapter(poly_cfg(root))
    assert ad.ids == ["ID1/a", "ID1/c", "ID2/b"] and ad.image_path("ID1/c") == inside
    assert ad.submission_id("ID1/c", "train") == "c.png"  # named as listed, not after the link target
    link(root / "train/DCM/ID1/d.png", outside / "stray.png")
    with escapes(r"train/DCM/ID1/d\.png: file is a symlink to .*stray\.png", root):
        make_adapter(poly_cfg(root)).ids


def test_polygon_symlinked_subject_folder(tmp_path, outside):
    root = poly_root(tmp_path)
    (root / "store").mkdir()
    (root / "train/DCM/ID2").rename(root / "store/ID2")
    link(root / "train/DCM/ID2", root / "store/ID2")  # inside the root: fine
    ad = make_adapter(poly_cfg(root))
    assert ad.ids == ["ID1/a", "ID2/b"] and ad.groups()["ID2/b"] == "ID2"
    link(root / "train/DCM/ID7", outside / "ID7")
    (root / "train/outputs_json/ID7").mkdir()
    with escapes(r"train/DCM/ID7: folder is a symlink", root):
        make_adapter(poly_cfg(root)).ids


def test_polygon_label_symlinks(tmp_path, outside):
    root = poly_root(tmp_path)
    (root / "train/outputs_json/ID1/a.json").unlink()
    link(root / "train/outputs_json/ID1/a.json", outside / "x.json")
    with pytest.raises(DataError, match=rf"label file 'train/outputs_json/ID1/a\.json' escapes the data root "
                                        rf"{root.resolve()} \(it resolves to .*outside/x\.json"):
        make_adapter(poly_cfg(root)).load_mask("ID1/a")
    (root / "train/outputs_json/ID1/a.json").unlink()
    link(root / "train/outputs_json/ID1/a.json", root / "train/outputs_json/ID2/b.json")  # inside: fine
    assert make_adapter(poly_cfg(root)).load_mask("ID1/a").sum() > 0
    # A symlinked label sub-folder is held to the same rule.
    (outside / "labels" / "b.json").write_text(json.dumps({"annotations": []}))
    moved = root / "train/outputs_json/ID2"
    for p in moved.iterdir():
        p.unlink()
    moved.rmdir()
    link(moved, outside / "labels")
    with pytest.raises(DataError, match=r"label file 'train/outputs_json/ID2/b\.json' escapes the data root"):
        make_adapter(poly_cfg(root)).load_mask("ID2/b")


def test_polygon_test_images_and_a_symlinked_data_root(tmp_path, outside):
    root = poly_root(tmp_path)
    alias = link(tmp_path / "alias", root)  # data_root itself may be a link (a big disk elsewhere)
    assert make_adapter(poly_cfg(alias)).ids == ["ID1/a", "ID2/b"]
    link(root / "test/DCM/ID9", outside / "ID7")
    with escapes(r"test/DCM/ID9: folder is a symlink", alias):
        make_adapter(poly_cfg(alias)).test_ids


# -- rle_csv -----------------------------------------------------------------------------------
def rle_root(tmp_path) -> Path:
    root = tmp_path / "rle"
    for i in ("s1/a", "s1/b", "s2/c"):
        png(root / "train_images" / f"{i}.png")
    pd.DataFrame({"id": ["s1/a"], "class": ["x"], "rle": ["1 3"]}).to_csv(root / "train.csv", index=False)
    return root


def rle_cfg(root: Path) -> CompetitionConfig:
    return CompetitionConfig(name="rle", data_root=str(root), format="rle_csv", classes=["x"],
                             groups={"source": "folder"})


def test_rle_image_and_subfolder_symlinks(tmp_path, outside):
    root = rle_root(tmp_path)
    link(root / "train_images/s3", root / "train_images/s2")  # inside: listed under its own name
    ad = make_adapter(rle_cfg(root))
    assert ad.ids == ["s1/a", "s1/b", "s2/c", "s3/c"] and ad.groups()["s3/c"] == "s3"
    link(root / "train_images/s1/z.png", outside / "stray.png")
    with escapes(r"train_images/s1/z\.png: file is a symlink", root):
        make_adapter(rle_cfg(root)).ids
    (root / "train_images/s1/z.png").unlink()
    link(root / "train_images/s9", outside / "ID7")
    with escapes(r"train_images/s9: folder is a symlink", root):
        make_adapter(rle_cfg(root)).ids


def test_rle_csv_symlink_outside_is_refused(tmp_path, outside):
    root = rle_root(tmp_path)
    (outside / "train.csv").write_text("id,class,rle\n")
    (root / "train.csv").unlink()
    link(root / "train.csv", outside / "train.csv")
    with pytest.raises(DataError, match=r"rle_csv\.csv 'train\.csv' escapes the data root .*through a symlink"):
        make_adapter(rle_cfg(root)).ids


def test_symlink_loop_and_broken_link(tmp_path):
    root = rle_root(tmp_path)
    link(root / "train_images/s1/loop", root / "train_images")
    with pytest.raises(DataError, match=r"s1/loop: symlink loop"):
        make_adapter(rle_cfg(root)).ids
    (root / "train_images/s1/loop").unlink()
    link(root / "train_images/s1/gone.png", root / "nowhere.png")
    with pytest.raises(DataError, match=r"s1/gone\.png: file is a broken symlink"):
        make_adapter(rle_cfg(root)).ids


# -- mask_folders ------------------------------------------------------------------------------
def mf_root(tmp_path) -> Path:
    root = tmp_path / "mf"
    for i in ("a", "b"):
        png(root / "images" / f"{i}.png")
        png(root / "masks" / f"{i}.png", value=255)
    return root


def mf_cfg(root: Path, mode="binary", classes=("n",)) -> CompetitionConfig:
    return CompetitionConfig(name="mf", data_root=str(root), format="mask_folders", classes=list(classes),
                             mask_folders={"mask_mode": mode}, groups={"source": "none"})


def test_mask_folders_image_symlinks(tmp_path, outside):
    root = mf_root(tmp_path)
    link(root / "images/c.png", root / "images/a.png")
    png(root / "masks/c.png", value=255)
    assert make_adapter(mf_cfg(root)).ids == ["a", "b", "c"]
    link(root / "images/d.png", outside / "stray.png")
    with escapes(r"images/d\.png: file is a symlink", root):
        make_adapter(mf_cfg(root)).ids
    (root / "images/d.png").unlink()
    link(root / "images/sub", outside / "ID7")
    with escapes(r"images/sub: folder is a symlink", root):
        make_adapter(mf_cfg(root)).ids


def test_mask_file_symlinks(tmp_path, outside):
    root = mf_root(tmp_path)
    (root / "masks/b.png").unlink()
    link(root / "masks/b.png", root / "masks/a.png")  # inside: fine
    assert make_adapter(mf_cfg(root)).load_mask("b").shape == (1, 20, 30)
    (root / "masks/a.png").unlink()
    link(root / "masks/a.png", outside / "stray.png")
    with pytest.raises(DataError, match=rf"mask file 'masks/a\.png' escapes the data root {root.resolve()}"):
        make_adapter(mf_cfg(root)).load_mask("a")


def test_per_class_mask_folder_symlink(tmp_path, outside):
    root = tmp_path / "pc"
    png(root / "images/a.png")
    png(root / "images/b.png")
    png(root / "masks/b/p.png", value=255)
    link(root / "masks/a", outside / "ID7")
    ad = make_adapter(mf_cfg(root, "per_class", ("p",)))
    assert ad.load_mask("b").shape == (1, 20, 30)
    with pytest.raises(DataError, match=r"mask folder 'masks/a' escapes the data root .*through a symlink"):
        ad.load_mask("a")
