"""Which recipe a command means: ``--ensemble NAME``, a YAML path, or the newest in ``ensembles/``.

Its own module so that ``competition export`` (which ``run`` imports for ``--runtime onnx``) and
``run`` both find recipes one way without importing each other.
"""
from __future__ import annotations

from pathlib import Path

from competition import paths
from competition.config import ConfigError


def resolve_recipe(name: str | None) -> Path:
    """``ensembles/<name>.yaml`` or a YAML path; with no name, the newest recipe in ``ensembles/``."""
    folder = paths.ensembles_dir()
    known = sorted(folder.glob("*.yaml"), key=lambda p: p.stat().st_mtime)
    if name is None:
        if not known:
            raise ConfigError(f"no recipe in {folder}: build one with `make ensemble`, or predict one "
                              f"experiment with `competition predict --exp E`")
        return known[-1]
    p = Path(name)
    if p.suffix in (".yaml", ".yml"):
        return p
    path = paths.recipe(name)
    if not path.is_file():
        raise ConfigError(f"unknown ensemble {name!r}: no {path}; known: "
                          f"{', '.join(q.stem for q in known) or '(none)'}")
    return path
