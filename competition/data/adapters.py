"""Adapter factory: a competition's ``format`` key -> the class that reads its data."""
from __future__ import annotations

from competition.config import CompetitionConfig
from competition.data import mask_folders, polygon, rle_csv  # noqa: F401 (each format registers itself)
from competition.data.base import ADAPTERS, Adapter
from competition.data.synthetic import ensure_generated


def make_adapter(cfg: CompetitionConfig) -> Adapter:
    """The adapter for ``cfg.format``; generates the embedded synthetic data first when configured."""
    if cfg.synthetic is not None:
        ensure_generated(cfg)
    return ADAPTERS.build(cfg.format, cfg)
