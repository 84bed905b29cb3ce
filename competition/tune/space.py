"""A search space applied to an experiment: dotted keys (list items by index), Optuna sampling, the
trial's experiment, and the best trial written back as a ready experiment YAML.

Hand-written because Optuna samples values but knows nothing of our config: these functions turn a
sampled value into the config value (a labelled structure, a symmetric range) at a dotted path.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from competition import paths
from competition.config import (
    ConfigError,
    ExperimentConfig,
    SearchParam,
    SearchSpace,
    atomic_write_text,
    load_experiment,
    to_plain,
    validate,
)


def set_path(data: dict, key: str, value: Any, source: str = "") -> None:
    """``data[a][b][1][c] = value`` for ``key = "a.b.1.c"``; missing mapping levels are created (an
    unknown key is then reported by validation), a missing list item is an error."""
    *parents, last = key.split(".")
    cur: Any = data
    for i, part in enumerate(parents):
        where = ".".join(parents[:i + 1])
        if isinstance(cur, list):
            cur = cur[_index(cur, part, where, key, source)]
        elif isinstance(cur, dict):
            cur = cur.setdefault(part, {})
        else:
            raise ConfigError(f"{source}{key}: {'.'.join(parents[:i])!r} is a value, not a section")
        if not isinstance(cur, (dict, list)):
            raise ConfigError(f"{source}{key}: {where!r} is a value ({cur!r}), not a section or list")
    if isinstance(cur, list):
        cur[_index(cur, last, key, key, source)] = value
    else:
        cur[last] = value


def _index(items: list, part: str, where: str, key: str, source: str) -> int:
    if not part.lstrip("-").isdigit() or not -len(items) <= int(part) < len(items):
        parent = where.rsplit(".", 1)[0]
        raise ConfigError(f"{source}{key}: {parent!r} is a list of {len(items)} item(s) in the base "
                          f"experiment; {part!r} is not an index into it")
    return int(part)


def config_value(param: SearchParam, raw: Any) -> Any:
    """The config value for an Optuna value: a labelled choice's structure, or ``[-v, v]``."""
    if param.type == "categorical" and isinstance(param.choices, dict):
        return copy.deepcopy(param.choices[raw])
    if param.type == "int":
        raw = int(raw)
    return [-raw, raw] if param.symmetric else raw


def suggest(trial, params: dict[str, SearchParam]) -> dict[str, Any]:
    """Sample every parameter; returns dotted key -> config value."""
    out = {}
    for key, p in params.items():
        if p.type == "categorical":
            labels = list(p.choices) if isinstance(p.choices, dict) else p.choices
            raw = trial.suggest_categorical(key, labels)
        elif p.type == "int":
            raw = trial.suggest_int(key, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
        else:
            raw = trial.suggest_float(key, p.low, p.high, step=p.step, log=p.log)
        out[key] = config_value(p, raw)
    return out


def build(base: dict, values: dict[str, Any], source: str) -> ExperimentConfig:
    """The base experiment (plain data) with ``values`` (dotted keys) applied, validated."""
    data = copy.deepcopy(base)
    for key, value in values.items():
        set_path(data, key, copy.deepcopy(value), f"{source}: ")
    return validate(ExperimentConfig, data, f"{source} applied to experiment {base.get('name')!r}")


def check(space: SearchSpace, base: dict, source: str) -> None:
    """Fail before any training if a key or a value at either end of a range is invalid."""
    for end in (0, -1):
        values = dict(space.fixed)
        for key, p in space.params.items():
            if p.type == "categorical":
                labels = list(p.choices) if isinstance(p.choices, dict) else p.choices
                values[key] = config_value(p, labels[end])
            else:
                values[key] = config_value(p, p.low if end == 0 else p.high)
        build(base, values, source)


def tuned_config_path(exp: str) -> Path:
    return paths.project() / "configs" / "experiments" / f"{Path(exp).stem}-tuned.yaml"


def write_tuned(exp: str, best: dict[str, Any], comment: str) -> Path:
    """``configs/experiments/<exp>-tuned.yaml``: ``extends: <exp>`` plus the best values, as whole
    second-level keys (``extends`` merges one level deep). The tuning-only ``fixed`` values and the
    epoch budget are left out: the tuned experiment trains for the base experiment's full length."""
    base = to_plain(load_experiment(exp))
    resolved = to_plain(build(base, best, "best trial"))
    out: dict[str, Any] = {}
    for key in best:
        section, *rest = key.split(".")
        if not rest or not isinstance(resolved.get(section), dict):
            out[section] = resolved[section]
        else:
            out.setdefault(section, {})[rest[0]] = resolved[section][rest[0]]
    path = tuned_config_path(exp)
    # A name is looked up the way `competition train` looks it up; a path stays a path.
    parent = str(Path(exp).resolve()) if Path(exp).suffix in (".yaml", ".yml") else exp
    text = "".join(f"# {line}\n" for line in comment.splitlines())
    text += yaml.safe_dump({"name": path.stem, "extends": parent, **out}, sort_keys=False)
    atomic_write_text(path, text)
    load_experiment(path)  # what we wrote must load (and mean what the best trial trained)
    return path
