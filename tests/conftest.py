"""Fixtures built on the fly: a tiny synthetic hand-bone competition in a temporary project folder."""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")


def tiny_competition(name: str = "tiny-hands", subjects: int = 6, size: int = 64, **extra) -> dict:
    base = yaml.safe_load((REPO / "configs/competitions/synthetic-hands.yaml").read_text())
    base.update(name=name, data_root=f"data/{name}", folds=3)
    base["synthetic"] = {"subjects": subjects, "test_subjects": 2, "images_per_subject": 2, "size": size, "seed": 0}
    base.update(extra)
    return base


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A project folder (the cwd) with a tiny competition config ``tiny-hands``."""
    (tmp_path / "configs/competitions").mkdir(parents=True)
    (tmp_path / "configs/experiments").mkdir(parents=True)
    (tmp_path / "configs/competitions/tiny-hands.yaml").write_text(yaml.safe_dump(tiny_competition()))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def tiny_data_cache(tmp_path_factory) -> Path:
    """Generated once per session; copy it into a project with ``use_cached_data``."""
    root = tmp_path_factory.mktemp("cache")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        from competition.config import CompetitionConfig, validate
        from competition.data.synthetic import ensure_generated
        ensure_generated(validate(CompetitionConfig, tiny_competition(), "tiny"))
    finally:
        os.chdir(cwd)
    return root / "data" / "tiny-hands"


@pytest.fixture
def tiny_project(project, tiny_data_cache) -> Path:
    shutil.copytree(tiny_data_cache, project / "data" / "tiny-hands")
    return project


@contextmanager
def trained_core(root: Path, data: Path, experiment: dict):
    """``root`` as the cwd of a project with the tiny competition (``data`` copied in) and experiment
    ``core`` = ``experiment``, its folds made and fold 0 trained; the cwd is restored on exit."""
    (root / "configs/competitions").mkdir(parents=True)
    (root / "configs/experiments").mkdir(parents=True)
    (root / "configs/competitions/tiny-hands.yaml").write_text(yaml.safe_dump(tiny_competition()))
    (root / "configs/experiments/core.yaml").write_text(yaml.safe_dump(experiment))
    shutil.copytree(data, root / "data/tiny-hands")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        from competition.cli import main
        from competition.config import load_experiment
        from competition.train.loop import fit
        assert main(["folds", "--comp", "tiny-hands"]) == 0
        fit(load_experiment("core"), 0, log=lambda *_: None)
        yield root
    finally:
        os.chdir(cwd)


def private_copy(trained: Path, tmp_path: Path, monkeypatch) -> Path:
    """A copy of a module's trained project (without what tests never read) as the cwd: tests may
    corrupt or add files."""
    p = tmp_path / "proj"
    shutil.copytree(trained, p, ignore=shutil.ignore_patterns("last.pt", "oof", "wandb"))
    monkeypatch.chdir(p)
    return p


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one CPU thread; restores the count after the module."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
