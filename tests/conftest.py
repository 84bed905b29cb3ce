"""Fixtures built on the fly: a tiny synthetic hand-bone competition in a temporary project folder."""
from __future__ import annotations

import os
import shutil
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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one CPU thread; restores the count after the module."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
