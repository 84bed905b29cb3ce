"""Adapter factory: a competition's ``format`` key -> the class that reads its data."""
from __future__ import annotations

from competition.config import CompetitionConfig
from competition.data.base import Adapter
from competition.registry import Registry

ADAPTERS = Registry("dataset format")


def make_adapter(cfg: CompetitionConfig) -> Adapter:
    """The adapter for ``cfg.format``; generates the embedded synthetic data first when configured."""
    # Imported here so each format module registers itself without import cycles.
    from competition.data import mask_folders, polygon, rle_csv  # noqa: F401
    if cfg.synthetic is not None:
        from competition.data.synthetic import ensure_generated
        ensure_generated(cfg)
    return ADAPTERS.build(cfg.format, cfg)
