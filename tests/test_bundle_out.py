"""`competition bundle NAME --out DIR` never deletes what it did not write: DIR must be absent, empty,
or a bundle of ours (its marker lists every entry); a bundle of the version before the marker is
replaced only when it is exactly that layout. Replacing is a swap: a failed build leaves the old one."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import trained_core
from test_installs import EXP, write_recipe

from competition.cli import main
from competition.predict import bundle as b

LAYOUT = ["README.md", "checkpoints", "competition.yaml", "recipe.yaml", "run.py"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data_cache) -> Path:
    """A project with one tiny experiment `core`, fold 0 trained (1 epoch), and its recipe `core`."""
    root = tmp_path_factory.mktemp("bundled")
    with trained_core(root, tiny_data_cache, {**EXP, "tracking": {"wandb": False}}):
        write_recipe(root)
    return root


@pytest.fixture
def proj(trained, monkeypatch) -> Path:
    monkeypatch.chdir(trained)
    return trained


def bundle(out: Path) -> int:
    return main(["bundle", "core", "--out", str(out)])


def refusal(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_a_folder_with_a_recipe_and_a_users_file_is_refused_and_kept(proj, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "recipe.yaml").write_text("my own recipe\n")
    (out / "notes.txt").write_text("precious\n")
    assert bundle(out) == 2
    err = refusal(capsys)
    assert str(out) in err and "notes.txt" in err and "choose an empty or new folder" in err, err
    assert (out / "notes.txt").read_text() == "precious\n" and (out / "recipe.yaml").read_text() == "my own recipe\n"
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "recipe.yaml"]
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]  # no temp folder left beside it


def test_absent_and_empty_folders_get_a_bundle_with_its_marker(proj, tmp_path, capsys):
    for out in (tmp_path / "new/bundle", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        assert bundle(out) == 0, capsys.readouterr().err
        assert sorted(p.name for p in out.iterdir()) == sorted(LAYOUT + [b.MARKER])
        marker = json.loads((out / b.MARKER).read_text())
        assert marker["format"] == b.FORMAT and marker["recipe"] == "core"
        assert marker["entries"] == sorted(LAYOUT) + [b.MARKER]
        assert "checkpoints/core-fold0.pt" in marker["files"]
        assert b._foreign(out) == []


def test_rebundling_into_our_bundle_replaces_it_and_a_users_file_in_it_refuses(proj, tmp_path, capsys):
    out = tmp_path / "bundle"
    assert bundle(out) == 0
    (out / "README.md").write_text("edited")  # our own file, edited: still ours to replace
    assert bundle(out) == 0
    assert "edited" not in (out / "README.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # the old one was deleted, no temp left
    for extra in ("submission.csv", "checkpoints/my-best.pt"):
        (out / extra).write_text("mine")
        assert bundle(out) == 2
        err = refusal(capsys)
        assert extra in err and "1 in all" in err, err
        assert (out / extra).read_text() == "mine"
        (out / extra).unlink()
    assert bundle(out) == 0


def test_a_bundle_of_the_previous_version_is_replaced_only_when_it_is_exactly_its_layout(proj, tmp_path, capsys):
    out = tmp_path / "old"
    assert bundle(out) == 0
    (out / b.MARKER).unlink()  # what the version before the marker wrote
    assert b._foreign(out) == []
    (out / "my-notes.md").write_text("mine")
    assert bundle(out) == 2
    assert "my-notes.md" in refusal(capsys)
    (out / "my-notes.md").unlink()
    (out / "checkpoints/extra").mkdir()
    assert bundle(out) == 2
    assert "checkpoints/extra" in refusal(capsys)
    (out / "checkpoints/extra").rmdir()
    assert bundle(out) == 0
    assert (out / b.MARKER).is_file()
    # The same names, not written by us: a user's project with its own run.py and recipe.yaml.
    theirs = tmp_path / "theirs"
    (theirs / "checkpoints").mkdir(parents=True)
    for name in ("run.py", "recipe.yaml", "competition.yaml"):
        (theirs / name).write_text("my own\n")
    (theirs / "checkpoints/model.pt").write_text("weights")
    assert bundle(theirs) == 2
    err = refusal(capsys)
    assert "checkpoints, competition.yaml, recipe.yaml, run.py (4 in all)" in err, err
    assert (theirs / "checkpoints/model.pt").read_text() == "weights"


def test_a_file_or_a_link_at_out_is_refused(proj, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("data")
    assert bundle(f) == 2
    err = refusal(capsys)
    assert "is a file, not a folder" in err and str(f) in err
    assert f.read_text() == "data"
    target = tmp_path / "target"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    assert bundle(tmp_path / "link") == 2
    assert "symbolic link" in refusal(capsys)


def test_a_failed_build_leaves_the_old_bundle_whole(proj, tmp_path, monkeypatch):
    out = tmp_path / "bundle"
    assert bundle(out) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(b.ckpt, "save", full_disk)
    assert bundle(out) == 2
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_many_foreign_entries_are_named_first_few_and_counted(proj, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "recipe.yaml").write_text("x")
    for i in range(7):
        (out / f"f{i}.txt").write_text("x")
    assert bundle(out) == 2
    err = refusal(capsys)
    assert "f0.txt, f1.txt, f2.txt, f3.txt, f4.txt and 3 more (8 in all)" in err, err
    assert len(list(out.iterdir())) == 8
