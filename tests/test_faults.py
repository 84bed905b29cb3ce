"""Fault suite ("Safe for a team"): real ``python -m competition ...`` processes are SIGKILLed at many
points of ``folds``, ``train``, ``ensemble`` and ``submit`` and the same command is run again.

After every kill and after every rerun :func:`check_artifacts` walks the whole project and asserts

1. no half-written *named* artifact: every file or folder under its final name is complete and valid
   (folds CSV, generated data, ``last.pt``/``best.pt``, ``metrics.json``, ``history.csv``, OOF stores,
   the truth cache, recipes, submission CSVs scored strictly against the test truth, the ledger);
2. temp files and folders a killed process leaves (``.<name>.<8 random>.tmp``, hidden temp folders)
   are hidden, of a known shape, and never taken for artifacts (no file without a leading dot is
   a partial artifact, and the reruns succeed with them present);

and each chain ends with a rerun that exits 0 and whose result equals an uninterrupted run's.

Two kinds of kill:

- *timed / polled*: the process is killed from outside after a delay (fractions of the command's
  uninterrupted duration, measured in the test) or the moment a file appears (a ``.last.pt`` temp,
  a checkpoint);
- *injected*: for the narrow windows (half-way through writing ``last.pt``, between the two renames
  that swap an OOF store, between a submission's rename and its ledger row, ...) the subprocess
  kills *itself* with SIGKILL at an exact call. A ``sitecustomize.py`` on ``PYTHONPATH``, active only
  when ``COMPETITION_FAULT`` is set, wraps one function (see ``HOOK``); the command line is still the
  real ``python -m competition ...``. ``"when": "partial"`` truncates the file being written to half
  first, which is what a kill in the middle of the write leaves.

Tiny everything (tu-test_resnet, 32 px, 2-3 epochs, 3 folds, one thread) so the file runs in a few
minutes on 2 cores; most of each subprocess's time is importing torch and timm.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import tiny_competition

EXP = {"competition": "tiny-hands",
       "model": {"arch": "Unet", "encoder": "tu-test_resnet", "decoder_channels": [16, 16, 16, 16, 16]},
       "optimizer": {"name": "adamw", "lr": 0.003}, "scheduler": {"name": "cosine", "warmup_epochs": 0},
       "data": {"input_size": 32, "batch_size": 4, "workers": 0},
       "train": {"epochs": 2, "progress": False, "seed": 0}, "tracking": {"wandb": False}}
COMP = "tiny-hands"
KILLED = -signal.SIGKILL

# --------------------------------------------------------------------------------------------- #
# The injected kill: sitecustomize.py, active only when COMPETITION_FAULT is set
# --------------------------------------------------------------------------------------------- #
HOOK = r'''
"""Test hook (tests/test_faults.py): SIGKILL this process at one exact call.

COMPETITION_FAULT = {"target": "module:attr[.attr]" | "atomic", "n": N, "match": "substr", "when": W}
  the N-th call whose str/path arguments contain ``match`` (any call without one):
  W = "before": kill instead of calling; "after": kill right after it returns;
  "partial": after it returns, truncate its first argument (a file) to half, then kill.
  target "atomic": competition.io.atomic_path for targets matching ``match``; the kill lands after
  the temp file is written and before it is renamed ("partial": the temp is truncated first).
"""
import json as _json
import os as _os


def _install(spec):
    import importlib
    import signal
    count = [0]
    when = spec["when"]

    def die():
        _os.kill(_os.getpid(), signal.SIGKILL)

    def hit(args):
        m = spec.get("match")
        if m is not None and not any(m in str(a) for a in args if isinstance(a, (str, _os.PathLike))):
            return False
        count[0] += 1
        return count[0] == spec.get("n", 1)

    if spec["target"] == "atomic":
        from contextlib import contextmanager
        import competition.io as cio
        orig_ctx = cio.atomic_path

        @contextmanager
        def atomic_path(path):
            with orig_ctx(path) as tmp:
                yield tmp
                if hit([path]):
                    if when == "partial":
                        _os.truncate(tmp, _os.path.getsize(tmp) // 2)
                    die()
        cio.atomic_path = atomic_path
        return
    modname, _, attr = spec["target"].partition(":")
    owner = importlib.import_module(modname)
    *parents, name = attr.split(".")
    for p in parents:
        owner = getattr(owner, p)
    orig = getattr(owner, name)

    def wrapper(*args, **kwargs):
        h = hit(args)
        if h and when == "before":
            die()
        out = orig(*args, **kwargs)
        if h and when == "partial":
            _os.truncate(args[0], _os.path.getsize(args[0]) // 2)
        if h:
            die()
        return out
    setattr(owner, name, wrapper)


if _os.environ.get("COMPETITION_FAULT"):
    _install(_json.loads(_os.environ["COMPETITION_FAULT"]))
'''


@pytest.fixture(scope="module")
def hooks(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fault-hooks")
    (d / "sitecustomize.py").write_text(HOOK)
    return d


pytestmark = pytest.mark.usefixtures("one_thread")


class Runner:
    """``python -m competition ARGS`` in ``root``: uninterrupted, killed after a delay or when a
    condition holds, or killing itself at an injected fault. Output goes to a log outside ``root``."""

    def __init__(self, root: Path, hooks: Path, logs: Path):
        self.root, self.hooks, self.logs, self.n = root, hooks, logs, 0
        logs.mkdir(parents=True, exist_ok=True)

    def _env(self, fault: dict | None) -> dict:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
        env.pop("COMPETITION_FAULT", None)
        if fault is not None:
            env["PYTHONPATH"] = os.pathsep.join([str(self.hooks)] + [p for p in [env.get("PYTHONPATH")] if p])
            env["COMPETITION_FAULT"] = json.dumps(fault)
        return env

    @staticmethod
    def _wait(p, timeout):
        try:
            return p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)  # never leave a process of ours behind
            p.wait()
            raise

    def _start(self, args, fault=None):
        self.n += 1
        log = self.logs / f"{self.n:02d}-{args[0]}.log"
        f = open(log, "w")
        p = subprocess.Popen([sys.executable, "-m", "competition", *args], cwd=self.root, env=self._env(fault),
                             stdout=f, stderr=subprocess.STDOUT, text=True)
        return p, f, log

    def run(self, *args, timeout: float = 300) -> tuple[str, float]:
        """Uninterrupted: must exit 0. Returns (output, seconds)."""
        t0 = time.time()
        p, f, log = self._start(args)
        try:
            rc = self._wait(p, timeout)
        finally:
            f.close()
        out = log.read_text()
        assert rc == 0, f"`competition {' '.join(args)}` exited {rc}:\n{out[-4000:]}"
        return out, time.time() - t0

    def inject(self, fault: dict, *args, timeout: float = 300) -> str:
        """The process must reach the fault and die of SIGKILL there."""
        p, f, log = self._start(args, fault)
        try:
            rc = self._wait(p, timeout)
        finally:
            f.close()
        out = log.read_text()
        assert rc == KILLED, f"fault {fault} was not reached (exit {rc}):\n{out[-4000:]}"
        return out

    def kill_after(self, delay: float, *args) -> int:
        p, f, _ = self._start(args)
        try:
            p.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
        rc = p.wait()
        f.close()
        assert rc in (0, KILLED), f"exit {rc}"
        return rc

    def kill_when(self, cond, *args, timeout: float = 300, poll: float = 0.002) -> int:
        p, f, _ = self._start(args)
        deadline = time.time() + timeout
        try:
            while p.poll() is None and time.time() < deadline:
                if cond():
                    p.send_signal(signal.SIGKILL)
                    break
                time.sleep(poll)
            else:
                if p.poll() is None:
                    p.send_signal(signal.SIGKILL)
            rc = p.wait()
        finally:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()
            f.close()
        assert rc in (0, KILLED), f"exit {rc}"
        return rc


# --------------------------------------------------------------------------------------------- #
# Every artifact under its final name is complete; every hidden entry is a known temp
# --------------------------------------------------------------------------------------------- #
TOP = {"configs", "data", "folds", "runs", "ensembles", "submissions", "wandb"}
TEMP_DIR = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp(\.old)?$")  # oof.write's temp (and swapped-out) folders
OURS = {".lock", ".generated", ".generated.lock"}


def _hidden_ok(p: Path) -> bool:
    from competition.io import is_temp_name
    name = p.name
    if name in OURS and p.is_file():
        return True
    if p.is_file():
        return is_temp_name(name)
    return p.is_dir() and (bool(TEMP_DIR.match(name)) or name.startswith(".generating."))


def _entries(folder: Path, temps: list) -> list[Path]:
    """Non-hidden entries of ``folder``; hidden ones must be known temps (collected in ``temps``)."""
    out = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            assert _hidden_ok(p), f"{p}: a hidden entry that is no known temp or lock"
            if p.name not in OURS:
                temps.append(p)
        else:
            out.append(p)
    return out


def _bad(p: Path, why: str):
    raise AssertionError(f"{p}: {why}")


def _marker(root: Path) -> dict | None:
    m = root / ".generated"
    if not m.is_file():
        return None
    return json.loads(m.read_text())  # written atomically: always whole


def _check_data(root: Path, temps: list) -> bool:
    """Generated data: every file present is whole; a complete marker lists exactly the files."""
    import cv2
    found = []

    def walk(d: Path):
        for p in _entries(d, temps):
            if p.is_dir():
                walk(p)
                continue
            rel = p.relative_to(root).as_posix()
            found.append(rel)
            if p.suffix == ".png":
                img = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
                if img is None or img.shape[:2] != (64, 64):
                    _bad(p, "not a whole 64x64 PNG")
            elif p.suffix == ".json":
                if "annotations" not in json.loads(p.read_text()):
                    _bad(p, "no annotations")
            elif p.suffix == ".csv":
                df = pd.read_csv(p, keep_default_na=False, dtype=str)
                if len(df) != 4 * 12:
                    _bad(p, f"{len(df)} rows, expected 48")
            else:
                _bad(p, "unknown file in the data root")
    walk(root)
    marker = _marker(root)
    complete = bool(marker and marker.get("complete"))
    if complete:
        assert sorted(found) == sorted(marker["files"]), "the complete marker does not list the data's files"
    return complete


def _check_run(rp_root: Path, fold: int, folds: pd.DataFrame | None, temps: list) -> dict:
    from competition import checkpoint as ckpt
    from competition.store import tiles
    info = {}
    for p in _entries(rp_root, temps):
        if p.name in ("last.pt", "best.pt"):
            d = ckpt.load(p)  # raises CheckpointError on a partial file
            epoch = d["state"]["epoch"] if p.name == "last.pt" else d["epoch"]
            assert "model" in d and epoch >= 1, p
            info[p.name] = epoch
        elif p.name == "metrics.json":
            m = json.loads(p.read_text())
            assert {"val_dice", "oof_dice_native", "epochs_run"} <= set(m), p
            info["metrics"] = m
        elif p.name == "history.csv":
            h = pd.read_csv(p)
            assert len(h) >= 1 and h["epoch"].tolist() == list(range(1, len(h) + 1)), p
            info["history"] = len(h)
        elif p.name == "config.yaml":
            assert "experiment" in yaml.safe_load(p.read_text()), p
        elif p.is_dir() and (p.name == "oof" or p.name.startswith("oof-")):
            st = tiles.open_store(p)  # checks every file against the others
            ids = st.ids
            for i in range(len(st)):  # every byte readable, every row at its original size
                assert st.image(i).shape == (12, *st.sizes[i]), p
            if folds is not None:
                assert sorted(ids) == sorted(folds.loc[folds["fold"] == fold, "id"]), f"{p}: wrong ids"
            info.setdefault("oof", []).append(p.name)
        else:
            _bad(p, "unknown entry in a run folder")
    return info


def check_artifacts(root: Path) -> dict:
    """Validate everything under ``root`` (a project); returns what was found, and ``temps``."""
    from competition import ledger, score
    from competition.config import load_competition, load_recipe
    from competition.folds import load_folds
    temps: list[Path] = []
    found: dict = {"runs": {}, "recipes": [], "submissions": [], "ledger": None, "folds": None, "data": False}
    with contextlib.chdir(root):
        for p in _entries(root, temps):
            assert p.name in TOP, f"{p}: unexpected entry in the project"
        comp = load_competition(COMP)
        data = root / "data" / COMP
        if data.is_dir():
            found["data"] = _check_data(data, temps)
        folds_df = None
        if (root / "folds").is_dir():
            for p in _entries(root / "folds", temps):
                assert p.name == f"{COMP}.csv", p
                if found["data"]:
                    from competition.data.adapters import make_adapter
                    folds_df = load_folds(comp, make_adapter(comp))  # complete data: no generation
                else:
                    folds_df = load_folds(comp)
                assert len(folds_df) == 12 and sorted(set(folds_df["fold"])) == [0, 1, 2]
                found["folds"] = p
        if (root / "runs").is_dir():
            for e in _entries(root / "runs", temps):
                if e.name == "_truth":
                    from competition.store import tiles
                    for t in _entries(e, temps):
                        if not t.is_dir():
                            _bad(t, "unknown file in runs/_truth")
                        st = tiles.open_store(t)  # a published store is whole: every file checked
                        assert len(st) == 12 and len(st.classes) == 12, t
                        for i in range(len(st)):
                            st.image(i)
                    continue
                for f in _entries(e, temps):
                    m = re.fullmatch(r"fold(\d+)", f.name)
                    if not (m and f.is_dir()):
                        _bad(f, "unknown entry in an experiment folder")
                    found["runs"][(e.name, int(m[1]))] = _check_run(f, int(m[1]), folds_df, temps)
        if (root / "ensembles").is_dir():
            for p in _entries(root / "ensembles", temps):
                if p.suffix == ".yaml":
                    rec = load_recipe(p)
                    assert rec.members and len(rec.thresholds) == 12, p
                    found["recipes"].append(p)
                elif p.suffix == ".md":
                    text = p.read_text()
                    assert text.startswith("# Ensemble ") and text.endswith("\n") and "## Per class" in text, p
                else:
                    _bad(p, "unknown file in ensembles/")
        if (root / "submissions").is_dir():
            truth = data / "test_truth.csv"
            for p in _entries(root / "submissions", temps):
                if p.name == "ledger.csv":
                    found["ledger"] = ledger.read(p)
                elif p.suffix == ".csv":
                    # Strict scoring: every id x class exactly once, nothing extra, every RLE valid.
                    r = score.score_files(p, truth, comp)
                    assert r is not None
                    found["submissions"].append(p)
                else:
                    _bad(p, "unknown file in submissions/")
            if found["ledger"] is not None:
                for f in found["ledger"]["file"]:
                    assert (root / f).is_file(), f"ledger row for {f}, which does not exist"
    found["temps"] = temps
    return found


def new_project(root: Path, data_from: Path | None = None, **experiments) -> Path:
    (root / "configs/competitions").mkdir(parents=True)
    (root / "configs/experiments").mkdir(parents=True)
    (root / f"configs/competitions/{COMP}.yaml").write_text(yaml.safe_dump(tiny_competition()))
    for name, cfg in experiments.items():
        (root / f"configs/experiments/{name}.yaml").write_text(yaml.safe_dump(cfg))
    if data_from is not None:
        shutil.copytree(data_from, root / "data" / COMP)
    return root


def exp_with(**sections) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in EXP.items()}
    for k, v in sections.items():
        out[k] = {**out.get(k, {}), **v}
    return out


def installed(root: Path, pattern: str = "*.png") -> list[Path]:
    """Files under ``root`` outside hidden folders (pathlib's rglob descends into those too)."""
    return [p for p in root.rglob(pattern) if not any(s.startswith(".") for s in p.relative_to(root).parts)]


def temp_files(root: Path, pattern: str) -> set[Path]:
    return {p for p in root.glob(pattern) if p.is_file()}


# --------------------------------------------------------------------------------------------- #
# folds
# --------------------------------------------------------------------------------------------- #
@pytest.mark.slow
def test_folds_killed_during_generation_install_and_writing(tmp_path, hooks):
    """`competition folds` on a project without data: it generates the data (staging folder,
    install file by file, marker last), lists it, and writes folds/<comp>.csv."""
    ref = new_project(tmp_path / "ref")
    proj = new_project(tmp_path / "proj")
    _, t_ref = Runner(ref, hooks, tmp_path / "logs-ref").run("folds", "--comp", COMP)
    ref_csv = (ref / f"folds/{COMP}.csv").read_bytes()
    r = Runner(proj, hooks, tmp_path / "logs")
    args = ("folds", "--comp", COMP)
    data = proj / "data" / COMP

    # Generating into the staging folder: nothing is installed yet.
    r.inject({"target": "competition.data.synthetic:_write_image", "n": 5, "when": "before"}, *args)
    found = check_artifacts(proj)
    assert not found["data"] and not installed(data) and not found["folds"]
    # Half-way through installing the staged files: the marker says "incomplete".
    r.inject({"target": "os:replace", "match": f"{COMP}/train/DCM/", "n": 6, "when": "after"}, *args)
    found = check_artifacts(proj)
    assert _marker(data)["complete"] is False and not found["data"] and installed(data)
    # Writing the final marker (its temp half-written): the folder still says "incomplete".
    r.inject({"target": "atomic", "match": ".generated", "n": 2, "when": "partial"}, *args)
    found = check_artifacts(proj)
    assert _marker(data)["complete"] is False and not found["folds"]
    # Writing the folds CSV: its temp is half-written, no folds file under the final name.
    r.inject({"target": "atomic", "match": f"{COMP}.csv", "n": 1, "when": "partial"}, *args)
    found = check_artifacts(proj)
    assert found["data"] and not found["folds"]
    assert [p.name for p in found["temps"] if p.parent.name == "folds"]  # the half-written temp, hidden
    # The rerun finishes: the same folds file as an uninterrupted run.
    r.run(*args)
    found = check_artifacts(proj)
    assert found["data"] and (proj / f"folds/{COMP}.csv").read_bytes() == ref_csv
    assert not list(data.glob(".generating.*")), "staging folders are cleaned on rerun"

    # Timed kills, from a project without data each time, spread over the uninterrupted duration.
    for frac in (0.4, 0.7, 0.95):
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(proj / "folds", ignore_errors=True)
        r.kill_after(frac * t_ref, *args)
        check_artifacts(proj)
    r.run(*args)
    found = check_artifacts(proj)
    assert found["data"] and (proj / f"folds/{COMP}.csv").read_bytes() == ref_csv
    # The same command again keeps the file (the hidden temps beside it are not mistaken for it).
    from competition.cli import main
    with contextlib.chdir(proj), contextlib.redirect_stdout(io.StringIO()) as out:
        assert main(list(args)) == 0
    assert "exists and matches the dataset; kept it" in out.getvalue()


# --------------------------------------------------------------------------------------------- #
# train
# --------------------------------------------------------------------------------------------- #
def _last_epochs(proj: Path) -> dict:
    from competition import checkpoint as ckpt
    return {p.parent.name: ckpt.load(p)["state"]["epoch"] for p in sorted(proj.glob("runs/t/fold*/last.pt"))}


@pytest.mark.slow
def test_train_all_folds_killed_at_every_phase_then_resumed(tmp_path, tiny_data_cache, hooks):
    """`competition train --fold all` (3 folds x 3 epochs) killed during start-up and data listing,
    while writing last.pt, mid-epoch, while writing and while swapping an OOF store, and later; the
    last rerun equals an uninterrupted run."""
    from competition.store import tiles
    cfg = exp_with(train={"epochs": 3})
    ref = new_project(tmp_path / "ref", tiny_data_cache, t=cfg)
    proj = new_project(tmp_path / "proj", tiny_data_cache, t=cfg)
    args = ("train", "--exp", "t", "--fold", "all")
    from competition.cli import main
    for p in (ref, proj):
        with contextlib.chdir(p):
            assert main(["folds", "--comp", COMP]) == 0
    _, t_ref = Runner(ref, hooks, tmp_path / "logs-ref").run(*args)
    check_artifacts(ref)
    r = Runner(proj, hooks, tmp_path / "logs")
    runs = proj / "runs/t"

    # 1. Timed: early (imports, the data listing and checks, the model, or the first epoch).
    r.kill_after(0.45 * t_ref, *args)
    check_artifacts(proj)
    # 2. Polled: the moment a last.pt temp appears, i.e. while last.pt is being written.
    r.kill_when(lambda: bool(temp_files(proj, "runs/t/fold*/.last.pt.*.tmp")), *args)
    check_artifacts(proj)
    # 3. Injected: mid-epoch, between the first and second optimizer step of an epoch.
    r.inject({"target": "torch.nn.utils:clip_grad_norm_", "n": 2, "when": "before"}, *args)
    check_artifacts(proj)
    # 4. Injected: half-way through writing last.pt: the previous last.pt stays whole.
    before, temps_before = _last_epochs(proj), temp_files(proj, "runs/t/fold*/.last.pt.*.tmp")
    r.inject({"target": "atomic", "match": "last.pt", "n": 1, "when": "partial"}, *args)
    check_artifacts(proj)
    half = temp_files(proj, "runs/t/fold*/.last.pt.*.tmp") - temps_before
    assert len(half) == 1
    with pytest.raises(Exception):
        torch.load(next(iter(half)), weights_only=True)  # really half a checkpoint ...
    assert _last_epochs(proj) == before  # ... and the named one is untouched
    # 5. Injected: writing fold 0's second OOF store (the TTA variant; its writer has just made its
    #    hidden temp folder): the plain store is whole under its name, the variant is not there.
    r.inject({"target": "competition.store.tiles:StoreWriter.__init__", "match": "oof-identity+hflip", "n": 1,
              "when": "after"}, *args)
    found = check_artifacts(proj)
    assert not half & temp_files(proj, "runs/t/fold*/.*.tmp"), "the rerun removed the half-written last.pt temp"
    assert any(p.is_dir() and p.name.startswith(".oof-identity+hflip.") for p in found["temps"])
    assert found["runs"][("t", 0)]["oof"] == ["oof"] and "metrics" not in found["runs"][("t", 0)]
    # 6. Injected: the rerun predicts fold 0's OOF again and swaps the stores: killed between the
    #    two renames, the old store is gone from its name (never half there), the new one not yet in.
    r.inject({"target": "pathlib:Path.rename", "match": ".tmp.old", "n": 1, "when": "after"}, *args)
    found = check_artifacts(proj)
    assert "oof" not in found["runs"][("t", 0)] and "metrics" not in found["runs"][("t", 0)]
    assert any(p.name.endswith(".tmp.old") for p in found["temps"])
    # 7. Timed: later in the run (fold 0's OOF, or folds 1 and 2).
    r.kill_after(0.8 * t_ref, *args)
    check_artifacts(proj)
    # 8. The rerun completes every fold, as the uninterrupted run did.
    r.run(*args)
    found = check_artifacts(proj)
    want = check_artifacts(ref)
    for k in range(3):
        got, exp = found["runs"][("t", k)], want["runs"][("t", k)]
        assert got["last.pt"] == 3 and got["history"] == 3 and sorted(got["oof"]) == ["oof", "oof-identity+hflip"]
        assert got["best.pt"] == exp["best.pt"]
        assert got["metrics"]["val_dice"] == pytest.approx(exp["metrics"]["val_dice"], abs=1e-4)
        assert got["metrics"]["oof_dice_native"] == pytest.approx(exp["metrics"]["oof_dice_native"], abs=1e-3)
        a, b = tiles.open_store(runs / f"fold{k}/oof"), tiles.open_store(ref / f"runs/t/fold{k}/oof")
        assert a.ids == b.ids
        for i in range(len(a)):
            assert np.abs(a.image(i).astype(int) - b.image(i).astype(int)).max() <= 1
        hist, ref_hist = pd.read_csv(runs / f"fold{k}/history.csv"), pd.read_csv(ref / f"runs/t/fold{k}/history.csv")
        np.testing.assert_allclose(hist["val_dice"], ref_hist["val_dice"], atol=1e-4)
    # Temp files and the hidden temp folders of killed OOF writes are cleaned by the rerun (it holds
    # the folder's lock).
    assert not temp_files(proj, "runs/t/fold*/.*.tmp")
    assert not [p for p in proj.glob("runs/t/fold*/.oof*") if p.is_dir()]


@pytest.mark.slow
def test_kill_between_the_final_last_pt_and_history_csv(tmp_path, tiny_data_cache, hooks, monkeypatch):
    from competition.cli import main
    proj = new_project(tmp_path / "proj", tiny_data_cache, t=exp_with())
    monkeypatch.chdir(proj)
    assert main(["folds", "--comp", COMP]) == 0
    r = Runner(proj, hooks, tmp_path / "logs")
    r.inject({"target": "atomic", "match": "history.csv", "n": 2, "when": "before"}, "train", "--exp", "t",
             "--fold", "0")
    # last.pt is written in the background: it holds epoch 2 if its write finished first, else epoch 1.
    assert _last_epochs(proj) in ({"fold0": 1}, {"fold0": 2})
    assert main(["train", "--exp", "t", "--fold", "0"]) == 0  # the same command, in-process
    found = check_artifacts(proj)
    assert found["runs"][("t", 0)]["metrics"]["epochs_run"] == 2
    assert found["runs"][("t", 0)]["history"] == 2, "history.csv is missing the last epoch"


@pytest.mark.slow
def test_full_disk_while_writing_last_pt_is_one_line_and_keeps_the_previous_checkpoint(tiny_project, capsys,
                                                                                       monkeypatch):
    """ENOSPC from torch.save (torch's own RuntimeError, which carries no errno: "unexpected pos" is
    what a full disk gives) in epoch 2's last.pt: exit 2, one stderr line naming the file and saying
    the disk is full; epoch 1's last.pt intact; after freeing space the same command resumes and
    finishes."""
    import shutil as sh
    from collections import namedtuple

    from competition import checkpoint as ckpt
    from competition.cli import main
    (tiny_project / "configs/experiments/t.yaml").write_text(yaml.safe_dump(exp_with()))
    assert main(["folds", "--comp", COMP]) == 0
    capsys.readouterr()
    real_save = torch.save
    saves = []

    def full_disk(obj, f, *a, **kw):
        if Path(f).name.startswith(".last.pt."):
            saves.append(f)
            if len(saves) == 2:
                real_save(obj, f, *a, **kw)
                os.truncate(f, os.path.getsize(f) // 3)  # what made it to disk
                raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 3456 vs 3392")
        return real_save(obj, f, *a, **kw)
    usage = namedtuple("usage", "total used free")
    real_usage = sh.disk_usage
    monkeypatch.setattr(ckpt.shutil, "disk_usage",
                        lambda p: usage(10 << 30, 10 << 30, 0) if len(saves) >= 2 else real_usage(p))
    monkeypatch.setattr(torch, "save", full_disk)
    assert main(["train", "--exp", "t", "--fold", "0"]) == 2
    err = capsys.readouterr().err.strip()
    last = tiny_project / "runs/t/fold0/last.pt"
    assert len(err.splitlines()) == 1, err
    assert str(last) in err and "disk is full" in err and "Traceback" not in err, err
    assert ckpt.load(last)["state"]["epoch"] == 1  # the previous checkpoint, whole
    assert not [p for p in last.parent.iterdir() if p.name.endswith(".tmp")], "the partial temp is removed"
    found = check_artifacts(tiny_project)
    assert found["runs"][("t", 0)]["last.pt"] == 1 and "metrics" not in found["runs"][("t", 0)]
    monkeypatch.setattr(torch, "save", real_save)  # space freed
    monkeypatch.setattr(ckpt.shutil, "disk_usage", real_usage)
    assert main(["train", "--exp", "t", "--fold", "0"]) == 0
    assert "resuming t fold 0" in capsys.readouterr().out
    found = check_artifacts(tiny_project)
    assert found["runs"][("t", 0)]["last.pt"] == 2 and found["runs"][("t", 0)]["metrics"]["epochs_run"] == 2


# --------------------------------------------------------------------------------------------- #
# ensemble and submit: on two experiments with every fold trained (in-process, once)
# --------------------------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data_cache) -> Path:
    """Experiments `a` and `b` (seeds 0, 1), every fold trained, and the recipe `blend` of both."""
    root = new_project(tmp_path_factory.mktemp("trained"), tiny_data_cache,
                       a=exp_with(), b=exp_with(train={"seed": 1}))
    with contextlib.chdir(root):
        from competition.cli import main
        assert main(["folds", "--comp", COMP]) == 0
        for name in ("a", "b"):
            assert main(["train", "--exp", name, "--fold", "all"]) == 0
        assert main(["ensemble", "--name", "blend", "a", "b"]) == 0
    return root


def copy_project(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("last.pt", "wandb"))
    return dst


def _recipe_essentials(path: Path) -> dict:
    from competition.config import load_recipe
    rec = load_recipe(path)
    return {"members": [(m.experiment, m.tta, m.weights, [c.sha256 for c in m.checkpoints]) for m in rec.members],
            "thresholds": rec.thresholds, "postprocess": {k: v.model_dump() for k, v in rec.postprocess.items()},
            "in_sample": rec.scores["in_sample"], "nested": rec.scores["nested"]}


@pytest.mark.slow
def test_ensemble_killed_during_truth_cache_search_native_pass_and_writing(trained, tmp_path, hooks):
    proj = copy_project(trained, tmp_path / "proj")
    r = Runner(proj, hooks, tmp_path / "logs")
    args = ("ensemble", "--name", "blend", "a", "b")
    recipe, report = proj / "ensembles/blend.yaml", proj / "ensembles/blend.md"
    _, t_ref = r.run(*args)
    ref, ref_bytes, ref_md = _recipe_essentials(recipe), recipe.read_bytes(), report.read_bytes()

    def unchanged():
        found = check_artifacts(proj)
        assert recipe.read_bytes() == ref_bytes and report.read_bytes() == ref_md
        return found

    # Building the truth store: killed after its second image, the store is only a hidden temp folder.
    shutil.rmtree(proj / "runs/_truth")
    r.inject({"target": "competition.store.tiles:StoreWriter.add_split", "n": 2, "when": "after"}, *args)
    assert not [p for p in (proj / "runs/_truth").iterdir() if not p.name.startswith(".")] and unchanged()["temps"]
    # The weight search (the second Caruana selection: a nested fold's).
    r.inject({"target": "competition.ensemble.search:caruana", "n": 2, "when": "before"}, *args)
    unchanged()
    # The native-resolution pass (its threshold histograms done, its components about to start).
    r.inject({"target": "competition.cv.native:components", "n": 1, "when": "before"}, *args)
    unchanged()
    # Writing the recipe: half of it in the temp; the old recipe stays whole and unchanged.
    r.inject({"target": "atomic", "match": "blend.yaml", "n": 1, "when": "partial"}, *args)
    unchanged()
    # Between the recipe and its report: the new recipe is whole (the report is the old one).
    r.inject({"target": "atomic", "match": "blend.md", "n": 1, "when": "before"}, *args)
    check_artifacts(proj)
    assert _recipe_essentials(recipe) == ref
    # Timed kills late in the run (earlier ones land in the imports).
    for frac in (0.7, 0.95):
        r.kill_after(frac * t_ref, *args)
        check_artifacts(proj)
    r.run(*args)
    found = check_artifacts(proj)
    assert found["recipes"] == [recipe] and _recipe_essentials(recipe) == ref
    assert len([p for p in (proj / "runs/_truth").iterdir() if not p.name.startswith(".")]) == 1
    # Hidden temps left in ensembles/ (kills before the rename) are never taken for recipes.
    from competition.predict.run import resolve_recipe
    with contextlib.chdir(proj):
        assert resolve_recipe(None).name == "blend.yaml"


@pytest.mark.slow
def test_kill_while_publishing_the_truth_store(trained, tmp_path, hooks, monkeypatch):
    from competition.cli import main
    proj = copy_project(trained, tmp_path / "proj")
    shutil.rmtree(proj / "runs/_truth")
    r = Runner(proj, hooks, tmp_path / "logs")
    args = ("ensemble", "--name", "blend", "a", "b")
    r.inject({"target": "competition.store.tiles:StoreWriter.close", "n": 1, "when": "before"}, *args)
    truth = proj / "runs/_truth"
    (temp,) = [p for p in truth.iterdir()]  # written whole, never published
    assert temp.name.startswith(".") and temp.is_dir()
    old = time.time() - 2 * 3600  # a killed build's temp, older than any build in progress
    os.utime(temp, (old, old))
    monkeypatch.chdir(proj)
    assert main(list(args)) == 0  # the same command, in-process
    check_artifacts(proj)
    assert [p.name.startswith(".") for p in truth.iterdir()] == [False]  # published; the stale temp removed


@pytest.mark.slow
def test_submit_killed_streaming_validating_and_recording(trained, tmp_path, hooks):
    proj = copy_project(trained, tmp_path / "proj")
    r = Runner(proj, hooks, tmp_path / "logs")
    args = ("submit", "--ensemble", "blend", "--no-progress", "--batch-size", "1", "--force")  # tiny models
    subs = proj / "submissions"
    _, t_ref = r.run(*args)
    found = check_artifacts(proj)
    assert len(found["submissions"]) == 1 and len(found["ledger"]) == 1
    ref = pd.read_csv(found["submissions"][0], keep_default_na=False, dtype=str)
    ref_ledger = (subs / "ledger.csv").read_bytes()

    def named():
        return sorted(p for p in subs.glob("*.csv") if p.name != "ledger.csv")

    # Streaming the CSV (after two images' rows), validating it: no new named submission, no
    # ledger row. (Timed kills below land in start-up and checkpoint loading.)
    for fault in ({"target": "competition.predict.submit:SubmissionWriter._write_head", "n": 2, "when": "after"},
                  {"target": "competition.predict.submit:validate_submission", "n": 1, "when": "before"}):
        r.inject(fault, *args)
        found = check_artifacts(proj)
        assert len(found["submissions"]) == 1 and (subs / "ledger.csv").read_bytes() == ref_ledger, fault
    streamed = [p for p in found["temps"] if p.parent == subs]
    assert len(streamed) == 2  # the CSVs killed while streamed and while validated, under temp names
    # Between the rename and the ledger row: a whole, valid submission that the ledger lacks.
    r.inject({"target": "competition.ledger:append", "n": 1, "when": "before"}, *args)
    found = check_artifacts(proj)
    assert len(found["submissions"]) == 2 and (subs / "ledger.csv").read_bytes() == ref_ledger
    # Writing the ledger: half of it in the temp; the ledger stays whole and unchanged.
    r.inject({"target": "atomic", "match": "ledger.csv", "n": 1, "when": "partial"}, *args)
    found = check_artifacts(proj)
    assert len(found["submissions"]) == 3 and (subs / "ledger.csv").read_bytes() == ref_ledger
    # Timed kills, late in the run.
    for frac in (0.6, 0.9):
        r.kill_after(frac * t_ref, *args)
        check_artifacts(proj)
    out, _ = r.run(*args)
    assert "validated" in out
    found = check_artifacts(proj)
    # Every submission, whichever run wrote it, holds the same predictions as the uninterrupted one.
    for p in named():
        pd.testing.assert_frame_equal(pd.read_csv(p, keep_default_na=False, dtype=str), ref)
    led = found["ledger"]
    assert len(led) >= 2 and led["file"].iloc[-1] == f"submissions/{named()[-1].name}"
    assert led["file"].iloc[0] == f"submissions/{found['submissions'][0].name}"
