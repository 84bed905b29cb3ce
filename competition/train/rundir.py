"""A run folder belongs to one configuration: what may change when a run is resumed or extended."""
from __future__ import annotations

import yaml

from competition import paths
from competition.config import ConfigError, read_yaml

EXTENDABLE = ("experiment.train.epochs", "experiment.train.early_stopping")  # schedule length only
# Keys that change how fast a run goes or where it is reported, never what it computes: a resumed
# run may change them (``experiment.tracking.*``: W&B project, entity, on/off).
NEUTRAL = ("experiment.data.cache", "experiment.data.workers", "experiment.train.progress")
NEUTRAL_PREFIXES = ("experiment.tracking.",)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def check_run_dir(rp: paths.RunPaths, run_cfg: dict, restart: bool) -> tuple | None:
    """A run folder belongs to one configuration: resuming under a changed config would mix two runs.
    The one change allowed is a longer schedule (more ``train.epochs``, another ``early_stopping``):
    the run then continues from last.pt. -> (old epochs, new epochs) when extending, else None."""
    if restart or not rp.last.is_file() or not rp.config.is_file():
        return None
    old, new = _flat(read_yaml(rp.config)), _flat(yaml.safe_load(yaml.safe_dump(run_cfg, sort_keys=False)))
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in NEUTRAL
                     and not k.startswith(NEUTRAL_PREFIXES))
    if not changed:
        return None
    e_old, e_new = old.get("experiment.train.epochs"), new.get("experiment.train.epochs")
    if set(changed) <= set(EXTENDABLE) and (e_new or 0) >= (e_old or 0):
        return e_old, e_new
    raise ConfigError(f"{rp.root} holds a run with a different configuration (changed: "
                      f"{[k.removeprefix('experiment.') for k in changed]}); only raising train.epochs (or "
                      f"changing train.early_stopping) continues a run; use a new experiment name, or --restart "
                      f"(RESTART=1) to start this fold over")
