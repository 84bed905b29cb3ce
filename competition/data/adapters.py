"""Adapter factory: a competition's ``format`` key -> the class that reads its data.

Each format's reader is the module ``competition/data/<format>.py`` (the name registered in
:data:`competition.config.FORMATS`), imported when a competition of that format is first read; its
Adapter registers itself in :data:`competition.data.base.ADAPTERS` under the same name.
"""
from __future__ import annotations

from importlib import import_module

from competition.config import FORMATS, CompetitionConfig
from competition.data.base import ADAPTERS, Adapter
from competition.data.synthetic import ensure_generated


def load_readers(names=None) -> None:
    """Import the reader module of each format in ``names`` (default: every registered format)."""
    for name in FORMATS if names is None else names:
        import_module(f"competition.data.{name}")


def make_adapter(cfg: CompetitionConfig) -> Adapter:
    """The adapter for ``cfg.format``; generates the embedded synthetic data first when configured."""
    if cfg.synthetic is not None:
        ensure_generated(cfg)
    load_readers([cfg.format])
    return ADAPTERS.build(cfg.format, cfg)
