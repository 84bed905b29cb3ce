"""Weights & Biases, never blocking and never fatal, plus nothing else: the local record of a run is
its own files (history.csv, metrics.json), which exist whether or not W&B does.

Offline unless the user configured W&B (``WANDB_API_KEY`` or a ``wandb login``) and its server answers
within a couple of seconds; otherwise runs are recorded offline under ``wandb/`` and ``make wandb-sync``
uploads them later. ``tracking.wandb: false`` in an experiment turns it off.
"""
from __future__ import annotations

import functools
import os
import socket
import warnings
from pathlib import Path
from urllib.parse import urlparse


def _configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


@functools.lru_cache(maxsize=None)
def _reachable(base_url: str, timeout: float = 2.0) -> bool:
    """A TCP connect to the W&B server: seconds, where wandb.init would wait its full init_timeout."""
    u = urlparse(base_url)
    try:
        socket.create_connection((u.hostname, u.port or (443 if u.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def _mode() -> str | None:
    """"offline" unless W&B is configured (or WANDB_MODE asks for online) and the server is reachable."""
    env = os.environ.get("WANDB_MODE")
    if env not in (None, "", "online", "run"):
        return None  # offline / disabled / dryrun: the user's choice stands
    if env is None and not _configured():
        return "offline"
    url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    if not _reachable(url):
        warnings.warn(f"W&B server {url} is unreachable; recording runs offline (make wandb-sync uploads them)")
        return "offline"
    return None


class Tracker:
    """A W&B run, or a no-op when disabled or when W&B fails; every call swallows W&B errors."""

    def __init__(self, enabled: bool, **init_kwargs):
        self.run = None
        if not enabled:
            return
        try:
            import wandb
            mode = _mode()
            if mode:
                init_kwargs["mode"] = mode
            init_kwargs.setdefault("dir", str(Path.cwd()))
            # W&B's metadata scan and system-stats sampler compete with training for the CPU; on a
            # 2-core machine they made epochs up to 20x slower. GPU runs keep the stats (GPU utilisation).
            import torch
            settings = wandb.Settings(silent=True, console="off", init_timeout=30, x_disable_meta=True,
                                      x_disable_stats=not torch.cuda.is_available())
            try:
                self.run = wandb.init(reinit="finish_previous", **init_kwargs, settings=settings)
            except Exception as e:
                if init_kwargs.get("mode") == "offline":
                    raise
                warnings.warn(f"W&B online start failed ({type(e).__name__}: {e}); recording this run offline")
                self.run = wandb.init(reinit="finish_previous", **{**init_kwargs, "mode": "offline"},
                                      settings=settings)
        except Exception as e:  # a broken install must not stop training
            warnings.warn(f"W&B disabled for this run: {type(e).__name__}: {e}")
            self.run = None

    @property
    def dir(self) -> Path | None:
        return Path(self.run.dir) if self.run is not None else None

    def log(self, data: dict, step: int | None = None) -> None:
        self._safe(lambda: self.run.log(data, step=step))

    def summary(self, data: dict) -> None:
        self._safe(lambda: self.run.summary.update(data))

    def table(self, key: str, columns: list[str], rows: list[list]) -> None:
        if self.run is None:
            return
        import wandb
        self._safe(lambda: self.run.log({key: wandb.Table(columns=columns, data=rows)}))

    def images(self, key: str, images: list, captions: list[str]) -> None:
        if self.run is None:
            return
        import wandb
        self._safe(lambda: self.run.log({key: [wandb.Image(im, caption=c) for im, c in zip(images, captions)]}))

    def finish(self) -> None:
        self._safe(lambda: self.run.finish())
        self.run = None

    def _safe(self, fn) -> None:
        if self.run is None:
            return
        try:
            fn()
        except Exception as e:
            warnings.warn(f"W&B call failed and was skipped: {type(e).__name__}: {e}")


def for_training(exp, comp, fold: int, config: dict) -> Tracker:
    """Project per competition, group = experiment (or ``tracking.group``: tuning sets the study),
    job_type = fold<k>, name = <exp>-fold<k>."""
    return Tracker(exp.tracking.wandb, project=exp.tracking.project or comp.name,
                   group=exp.tracking.group or exp.name, job_type=f"fold{fold}", name=f"{exp.name}-fold{fold}",
                   config=config)


def log_ensemble(recipe: dict, per_class: dict[str, float], enabled: bool = True,
                 project: str | None = None) -> None:
    """One W&B run per ensemble recipe: job_type ``ensemble``, group ``ensembles``, name = the recipe's
    name; the recipe as config, a member-weights table, a per-class score table, the scores in the summary.

    ``recipe``: the recipe as plain data (``to_plain(Recipe)``); ``per_class``: class -> score.
    """
    tr = Tracker(enabled, project=project or recipe.get("competition"), group="ensembles", job_type="ensemble",
                 name=str(recipe.get("name", "ensemble")), config=recipe)
    classes = list(recipe.get("classes") or per_class)
    rows = []
    for m in recipe.get("members", []):
        w = list(m.get("weights", []))
        per = w if len(w) == len(classes) else [w[0] if w else None] * len(classes)
        rows += [[m.get("experiment"), str(m.get("folds")), c, v] for c, v in zip(classes, per)]
    tr.table("ensemble_weights", ["experiment", "folds", "class", "weight"], rows)
    tr.table("ensemble_dice_per_class", ["class", "dice"], [[c, float(v)] for c, v in per_class.items()])
    scores = {k: v for k, v in (recipe.get("scores") or {}).items() if isinstance(v, (int, float, str))}
    tr.summary({**scores, **{f"dice/{c}": float(v) for c, v in per_class.items()},
                "members": len(recipe.get("members", []))})
    tr.finish()


def log_submission(row: dict, enabled: bool = True, project: str | None = None) -> None:
    """One W&B run per submission: job_type ``submission``, group ``submissions``; the ledger row as
    config and summary (so the dashboard can plot CV against LB across submissions)."""
    row = {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}  # numpy scalars from pandas
    name = str(row.get("file") or row.get("submission") or row.get("name") or "submission")
    tr = Tracker(enabled, project=project or row.get("competition"), group="submissions",
                 job_type="submission", name=Path(name).stem, config=row)
    tr.summary({k: v for k, v in row.items() if isinstance(v, (int, float, str)) or v is None})
    tr.finish()


def read_offline_run(run_dir: Path | str) -> dict:
    """What an offline run recorded: {"run": {project, group, job_type, name}, "config": {...},
    "history": [row, ...], "summary": {...}, "finished": bool}, read from its ``run-<id>.wandb``
    transaction log. W&B's service writes that file behind the run, so a run that has just finished
    may read ``finished: False`` (partial) for a moment.

    For checking runs before ``make wandb-sync`` (and for the tests). Hand-written because W&B 0.2x+
    dropped its Python reader: the file is a 7-byte header and LevelDB-log records (32 KiB blocks,
    7-byte record headers, FULL/FIRST/MIDDLE/LAST fragments) of ``wandb_internal.Record`` protobufs.
    """
    import json
    import struct
    from wandb.proto import wandb_internal_pb2 as pb

    files = sorted(Path(run_dir).glob("*.wandb"))
    if not files:
        raise FileNotFoundError(f"{run_dir}: no .wandb file (not a W&B run folder)")
    data = files[0].read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{files[0]}: not a W&B transaction log")
    out = {"run": {}, "config": {}, "history": [], "summary": {}, "finished": False}

    def put(d: dict, items) -> None:
        for i in items:  # a nested key (a table's or an image's fields) becomes nested dicts
            *parents, last = list(i.nested_key) or [i.key]
            cur = d
            for k in parents:
                cur = cur.setdefault(k, {})
            cur[last] = json.loads(i.value_json) if i.value_json else None

    pos, block, frag = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (crc, n, kind) == (0, 0, 0):  # block trailer / zero padding
            pos += left
            continue
        if pos + 7 + n > len(data):
            break  # a record still being written
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        frag = chunk if kind in (1, 2) else frag + chunk
        if kind not in (1, 4):
            continue
        rec = pb.Record()
        rec.ParseFromString(frag)
        which = rec.WhichOneof("record_type")
        if which == "run":
            r = rec.run
            out["run"] = {"project": r.project, "group": r.run_group, "job_type": r.job_type,
                          "name": r.display_name, "id": r.run_id}
            put(out["config"], r.config.update)
        elif which == "config":
            put(out["config"], rec.config.update)
        elif which == "history":
            out["history"].append({})
            put(out["history"][-1], rec.history.item)
        elif which == "summary":
            put(out["summary"], rec.summary.update)
        elif which == "exit":
            out["finished"] = True
    out["config"].pop("_wandb", None)
    return out
