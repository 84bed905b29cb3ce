"""`competition bundle --wheels` (make bundle WHEELS=1): the bundle's wheels/ installs into a fresh virtual
environment with the package index unreachable, and run.py there writes the CSV `competition submit`
writes, byte for byte. Building wheels/ needs the index (pip download), as it does for a user."""
from __future__ import annotations

import importlib.metadata as md
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_installs import CLI, EXP, REPO, python, write_recipe

from competition.installs import closure, project_requirements

pytestmark = pytest.mark.slow


def kaggle_torch(folder: Path) -> list[str]:
    """Test-only stand-in for the torch a Kaggle image has preinstalled: ``folder`` gets links to this
    environment's torch, torchvision and the packages only they need (CUDA libraries, sympy, ...);
    everything the package itself needs must come from wheels/. Returns the distributions linked."""
    ours = closure(project_requirements(REPO / "pyproject.toml"), skip=frozenset({"torch", "torchvision"}))
    theirs = sorted(set(closure(["torch", "torchvision"])) - set(ours))
    folder.mkdir()
    tops = set()
    for name in theirs:
        dist = md.distribution(name)
        tops |= {(Path(dist.locate_file("")), f.parts[0]) for f in dist.files if f.parts[0] != ".."}
    for site, top in sorted(tops):
        if not (folder / top).exists():
            (folder / top).symlink_to(site / top)
    return theirs


def test_bundle_with_wheels_runs_offline_in_a_fresh_venv(tiny_project, tmp_path):
    (tiny_project / "configs/experiments/core.yaml").write_text(
        yaml.safe_dump({**EXP, "tracking": {"wandb": False}}))
    for args in (["folds", "--comp", "tiny-hands"], ["train", "--exp", "core", "--fold", "0"]):
        r = python(CLI, *args, blocked=(), cwd=tiny_project)
        assert r.returncode == 0, r.stderr[-3000:]
    write_recipe(tiny_project)
    r = subprocess.run([sys.executable, "-m", "competition", "submit", "--ensemble", "core", "--out", "ref.csv",
                        "--no-progress", "--force"], cwd=tiny_project, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    bundle = tmp_path / "bundle"
    r = subprocess.run([sys.executable, "-m", "competition", "bundle", "core", "--out", str(bundle), "--wheels"],
                       cwd=tiny_project, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    wheels = {p.name.split("-")[0].lower() for p in (bundle / "wheels").glob("*.whl")}
    assert {"competition", "numpy", "timm", "segmentation_models_pytorch", "albumentations"} <= wheels
    assert not wheels & {"torch", "torchvision", "optuna", "wandb", "matplotlib"}
    assert "wheels/ (" in r.stdout and "wheels/" in (bundle / "README.md").read_text()

    fresh = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", str(fresh)], check=True, timeout=300)
    # Python 3.11's venv seeds setuptools 65, which would hide the newer one torch requires (linked below).
    subprocess.run([str(fresh / "bin/python"), "-m", "pip", "uninstall", "-q", "-y", "setuptools"], check=True,
                   timeout=300, env={**os.environ, "PIP_CONFIG_FILE": os.devnull})
    site = fresh / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    linked = kaggle_torch(tmp_path / "kaggle-torch")
    assert {"torch", "torchvision"} <= set(linked) and "numpy" not in linked
    (site / "kaggle_torch.pth").write_text(str(tmp_path / "kaggle-torch") + "\n")
    # No index and no network: pip's configuration is ignored and every proxy points at a closed port.
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "OMP_NUM_THREADS": "1", "PIP_CONFIG_FILE": os.devnull,
           "PYTHONNOUSERSITE": "1", "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1",
           **{k: "http://127.0.0.1:9" for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")}}
    elsewhere = tmp_path / "elsewhere"  # no project: only the bundle and the data
    elsewhere.mkdir()
    r = subprocess.run([str(fresh / "bin/python"), str(bundle / "run.py"), "--data-root",
                        str(tiny_project / "data/tiny-hands"), "--out", "submission.csv", "--no-progress",
                        "--force"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    assert "48 rows" in r.stdout
    assert (elsewhere / "submission.csv").read_bytes() == (tiny_project / "ref.csv").read_bytes()
    where = subprocess.run([str(fresh / "bin/python"), "-c", "import competition, numpy, torch; "
                            "print(competition.__file__, numpy.__file__, torch.__file__, sep='\\n')"],
                           env=env, capture_output=True, text=True, check=True).stdout.split()
    assert where[0].startswith(str(site)) and where[1].startswith(str(site))  # installed from wheels/
    assert where[2].startswith(str(tmp_path / "kaggle-torch"))  # the "preinstalled" torch
