"""Safe for a team: names that cannot escape their folders, one owner of artifact paths, a lock per
run folder, one-line errors for expected failures (and tracebacks for bugs), validation before work."""
from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_train import TINY, cli, write_exp

from competition import locks, paths
from competition.cli import main

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def folded(tiny_project):
    assert main(["folds", "--comp", "tiny-hands"]) == 0
    return tiny_project


def test_only_paths_spells_run_folder_file_names():
    """`grep '"best.pt"\\|"last.pt"\\|"metrics.json"\\|"probs.npy"' competition` finds them in paths.py only."""
    pattern = re.compile(r'"(best\.pt|last\.pt|metrics\.json|probs\.npy|history\.csv|config\.yaml)"')
    hits = [f"{p.relative_to(REPO)}:{i}" for p in (REPO / "competition").rglob("*.py") if p.name != "paths.py"
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", ".hidden", "x/../../y", ""])
def test_names_from_yaml_never_become_paths_outside_their_root(folded, capsys, name):
    (folded / "configs/experiments/bad.yaml").write_text(yaml.safe_dump({**TINY, "name": name}))
    assert main(["train", "--exp", "bad", "--fold", "0", "--check"]) == 2
    err = capsys.readouterr().err
    assert "name" in err and "Traceback" not in err
    with pytest.raises(Exception, match="name"):
        paths.recipe(name)
    with pytest.raises(Exception, match="name"):
        paths.submission(name, "20260101-000000")
    assert not (folded.parent / "x").exists() and not (folded / "runs").exists()


def test_check_validates_everything_before_any_model(folded, capsys, monkeypatch):
    import competition.models as models
    write_exp(folded, "ok")
    assert main(["train", "--exp", "ok", "--fold", "1", "--check"]) == 0
    assert "configuration ok" in capsys.readouterr().out
    assert not (folded / "runs").exists()  # nothing written
    monkeypatch.setattr(models, "build_model", lambda *a, **k: pytest.fail("the model was built"))
    for section, bad, words in [("optimizer", {"name": "adamx"}, "optimizer.name"),
                                ("loss", {"terms": [{"name": "dicee"}]}, "loss.terms[0].name"),
                                ("scheduler", {"name": "cosine", "warmup_epochs": 9}, "warmup"),
                                ("model", {"encoder": "resnet1888"}, "model.encoder"),
                                ("augment", {"train": [{"name": "Afine"}]}, "augment.train[0]")]:
        write_exp(folded, "bad", **{section: bad})
        assert main(["train", "--exp", "bad", "--fold", "0"]) == 2, section
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, (section, err)
    write_exp(folded, "ok")
    assert main(["train", "--exp", "ok", "--fold", "7", "--check"]) == 2
    assert "fold 7 does not exist" in capsys.readouterr().err


def test_a_second_train_of_one_fold_is_refused_naming_the_holder(folded, capsys):
    write_exp(folded, "t", train={"epochs": 1})
    rp = paths.run("t", 0)
    with locks.hold(rp.lock, True, f"run folder {rp.root}"):
        assert main(["train", "--exp", "t", "--fold", "0"]) == 2
        err = capsys.readouterr().err
        assert f"PID {os.getpid()}" in err and "in use by" in err and "Traceback" not in err
        assert main(["train", "--exp", "t", "--fold", "0", "--check"]) == 2
    assert not rp.last.exists() and not rp.config.exists()  # the refused run wrote nothing


@pytest.mark.slow
def test_two_concurrent_train_processes_one_refused_and_sigkill_releases_the_lock(folded):
    write_exp(folded, "t", train={"epochs": 30})
    first = subprocess.Popen([sys.executable, "-m", "competition", "train", "--exp", "t", "--fold", "0"],
                             cwd=folded, env={**os.environ, "OMP_NUM_THREADS": "1"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lock = folded / "runs/t/fold0/.lock"
    deadline = time.time() + 120
    while time.time() < deadline and not (lock.is_file() and lock.stat().st_size):
        time.sleep(0.2)
    try:
        second = cli(folded, "train", "--exp", "t", "--fold", "0", timeout=120)
        assert second.returncode == 2, second.stderr
        assert f"PID {first.pid}" in second.stderr and "competition train --exp t --fold 0" in second.stderr
        holder = json.loads(lock.read_text())
        assert holder["pid"] == first.pid
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # The kernel released the lock with the process: a check (which tries the lock) passes now.
    again = cli(folded, "train", "--exp", "t", "--fold", "0", "--check", timeout=120)
    assert again.returncode == 0 and "configuration ok" in again.stdout


def test_expected_failures_are_one_line_and_bugs_keep_their_traceback(folded, capsys, monkeypatch):
    import competition.cli as c
    from competition.train.engine import TrainingDiverged

    def raiser(exc):
        def fn(args):
            raise exc
        return fn
    for exc, words in [(TrainingDiverged("loss is nan at epoch 1, step 2"), "loss is nan"),
                       (OSError(errno.ENOSPC, "No space left on device", "runs/x/fold0/last.pt"), "disk is full"),
                       (OSError(errno.EROFS, "Read-only file system", "ensembles/b.yaml"), "read-only"),
                       (PermissionError(errno.EACCES, "Permission denied", "folds/x.csv"), "permission denied")]:
        monkeypatch.setattr(c, "cmd_folds", raiser(exc))
        assert c.main(["folds"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err
        if isinstance(exc, OSError):
            assert exc.filename in err
    for bug in (KeyError("oops"), ValueError("a bug of ours")):
        monkeypatch.setattr(c, "cmd_folds", raiser(bug))
        with pytest.raises(type(bug)):
            c.main(["folds"])


# A full disk while saving a checkpoint: tests/test_trust.py (told from an I/O error by the space left).


def test_shared_artifacts_follow_the_umask(folded):
    import torch

    from competition import checkpoint as ckpt
    from competition.config import dump_yaml
    old = os.umask(0o022)
    try:
        dump_yaml({"a": 1}, folded / "ensembles/r.yaml")
        ckpt.save({"a": torch.zeros(1)}, folded / "runs/x/fold0/best.pt")
    finally:
        os.umask(old)
    for p in (folded / "ensembles/r.yaml", folded / "runs/x/fold0/best.pt", folded / "folds/tiny-hands.csv"):
        assert oct(p.stat().st_mode & 0o777) == oct(0o644), p
