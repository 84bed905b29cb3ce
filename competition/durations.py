"""Durations as people write them: ``30m``, ``4h``, ``1h30m`` (``--budget``) and back."""
from __future__ import annotations

import re

from competition.errors import ConfigError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_budget(text: str) -> float:
    """``30m``, ``4h``, ``1h30m``, ``90s``, ``2d`` -> seconds."""
    parts = re.fullmatch(r"\s*((?:\d+(?:\.\d+)?\s*[smhd]\s*)+)", str(text or ""))
    if not parts:
        raise ConfigError(f"--budget {text!r}: expected a duration such as 30m, 4h, 1h30m or 90s")
    seconds = sum(float(n) * _UNITS[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)\s*([smhd])", parts.group(1)))
    if seconds < 60:
        raise ConfigError(f"--budget {text!r}: at least a minute (one epoch of every fold must fit)")
    return seconds


def duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600} h {s % 3600 // 60:02d} min" if s >= 3600 else f"{s // 60} min {s % 60:02d} s"
