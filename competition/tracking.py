"""Weights & Biases, never blocking and never fatal, plus nothing else: the local record of a run is
its own files (history.csv, metrics.json), which exist whether or not W&B does.

One W&B run per stage: ``job_type`` is ``train``, ``tune``, ``ensemble`` or ``submit``. Where runs go:
``WANDB_PROJECT`` > ``tracking.project`` > the competition name, ``WANDB_ENTITY`` > ``tracking.entity``
> the login's default entity. Online when a W&B login is configured (``WANDB_API_KEY``, or a
``.netrc`` entry for the server: W&B's cloud, or the self-hosted one of ``WANDB_BASE_URL`` / ``wandb
login --host``) and that server answers within a couple of seconds; otherwise recorded offline under
``wandb/`` for ``make wandb-sync``. ``tracking.wandb: false`` in an experiment turns it off.

Artifacts give the lineage submission <- recipe <- fold checkpoints <- their parents: a fold logs
``model-<exp>-fold<k>`` (best.pt, metrics.json, config.yaml, the OOF store's ids/meta; the all-data run
``model-<exp>-all-data``), a run started from another's weights (``model.init_from``) declares that
model artifact as its input, an ensemble declares its members' model artifacts as inputs and logs
``recipe-<name>``, a submission declares the recipe and logs ``submission-<name>`` (the CSV). An input
is declared by content (the same files give the same W&B digest, hence the same artifact version):
online with ``wandb.Run.use_artifact``; offline, where W&B declares no inputs, the run's config records
them (``input_artifacts``: name -> digest).
"""
from __future__ import annotations

import configparser
import functools
import hashlib
import netrc
import os
import re
import socket
import warnings
from pathlib import Path
from urllib.parse import urlsplit

import torch

from competition import paths
from competition.config import TrackingConfig, read_yaml, validate
from competition.io import file_hash

# W&B's cloud API hosts: api.wandb.ai, and CoreWeave's front for it (the SDK default since 0.2x).
CLOUD_HOSTS = ("api.wandb.ai", "api.forge.coreweave.com")
CLOUD_URL = "https://api.wandb.ai"


# ------------------------------------------------------------------------------------------------ #
# Where runs go, and whether online
# ------------------------------------------------------------------------------------------------ #
def target(cfg, default_project: str) -> dict:
    """``project``/``entity`` for wandb.init: W&B's variables, then the config keys, then the defaults
    (``cfg``: a TrackingConfig or None). An entity of None lets W&B use the login's default."""
    project = os.environ.get("WANDB_PROJECT") or (cfg.project if cfg else None) or default_project
    entity = os.environ.get("WANDB_ENTITY") or (cfg.entity if cfg else None)
    return {"project": project, **({"entity": entity} if entity else {})}


def server_url() -> str | None:
    """The W&B server a login was configured for, resolved as W&B does: ``WANDB_BASE_URL``, else the
    ``base_url`` that ``wandb login --host`` saved (the workspace's ``wandb/settings``, then
    ``$WANDB_CONFIG_DIR/settings`` or ``~/.config/wandb/settings``); None: W&B's cloud."""
    if url := os.environ.get("WANDB_BASE_URL"):
        return url
    config_dir = Path(os.environ.get("WANDB_CONFIG_DIR") or Path.home() / ".config" / "wandb")
    for f in (paths.project() / "wandb" / "settings", config_dir / "settings"):
        parser = configparser.ConfigParser()
        try:
            parser.read(f)
            if url := parser.get("default", "base_url", fallback=None):
                return url
        except (OSError, configparser.Error):
            continue
    return None


def _netrc_file() -> Path:
    """The file W&B reads logins from: ``$NETRC``, else ``~/.netrc`` (``~/_netrc`` if only that exists)."""
    if env := os.environ.get("NETRC"):
        return Path(env).expanduser()
    unix = Path.home() / ".netrc"
    return unix if unix.exists() or not (Path.home() / "_netrc").exists() else Path.home() / "_netrc"


def logged_in(url: str | None = None) -> bool:
    """A W&B login is configured for the server ``url`` (None: W&B's cloud): ``WANDB_API_KEY`` (or
    ``WANDB_IDENTITY_TOKEN_FILE``), or a ``.netrc`` entry with a key for that host (``wandb login``)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(url).netloc if url else ""
    hosts = (host,) if host and host not in CLOUD_HOSTS else CLOUD_HOSTS
    try:
        auth = netrc.netrc(_netrc_file())
    except (OSError, netrc.NetrcParseError):
        return False
    return any((entry := auth.authenticators(h)) and entry[2] for h in hosts)


@functools.lru_cache(maxsize=None)
def _reachable(base_url: str, timeout: float = 2.0) -> bool:
    """A TCP connect to the W&B server: seconds, where wandb.init would wait its full init_timeout."""
    u = urlsplit(base_url)
    try:
        socket.create_connection((u.hostname, u.port or (443 if u.scheme == "https" else 80)), timeout).close()
        return True
    except (OSError, ValueError):
        return False


def _default_url() -> str:
    try:
        import wandb  # noqa: PLC0415 (wandb: the track extra)
        return wandb.Settings().base_url  # the cloud URL this SDK version talks to
    except Exception:
        return CLOUD_URL


def mode() -> str | None:
    """"offline" unless a login is configured (or ``WANDB_MODE`` asks for online) and its server
    answers; None leaves the choice to W&B (online, or the user's ``WANDB_MODE``)."""
    env = os.environ.get("WANDB_MODE")
    if env not in (None, "", "online", "run"):
        return None  # offline / disabled / dryrun: the user's choice stands
    url = server_url()
    if not env and not logged_in(url):
        return "offline"
    url = url or _default_url()
    if not _reachable(url):
        warnings.warn(f"W&B server {url} is unreachable; recording runs offline (make wandb-sync uploads them)")
        return "offline"
    return None


# ------------------------------------------------------------------------------------------------ #
# The run
# ------------------------------------------------------------------------------------------------ #
class Tracker:
    """A W&B run, or a no-op when disabled or when W&B fails; every call swallows W&B errors."""

    def __init__(self, enabled: bool, **init_kwargs):
        self.run = None
        self._inputs: dict[str, str] = {}  # offline runs' input artifacts, name -> digest (use_artifact)
        if not enabled:
            return
        try:
            import wandb  # noqa: PLC0415 (wandb: the track extra)
        except ImportError as e:  # the W&B extra is not installed: one line, then untracked
            warnings.warn(f"W&B tracking is off: wandb is not installed ({e}); pip install -e '.[track]', "
                          f"or set tracking.wandb: false")
            return
        except Exception as e:  # a broken install must not stop training
            warnings.warn(f"W&B tracking is off: import wandb failed: {type(e).__name__}: {e}")
            return
        try:
            m = mode()
            if m:
                init_kwargs["mode"] = m
            init_kwargs.setdefault("dir", str(paths.project()))
            # W&B's metadata scan and system-stats sampler compete with training for the CPU; on a
            # 2-core machine they made epochs up to 20x slower. GPU runs keep the stats (GPU utilisation).
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
        import wandb  # noqa: PLC0415 (wandb: the track extra)
        self._safe(lambda: self.run.log({key: wandb.Table(columns=columns, data=rows)}))

    def images(self, key: str, images: list, captions: list[str]) -> None:
        if self.run is None:
            return
        import wandb  # noqa: PLC0415 (wandb: the track extra)
        self._safe(lambda: self.run.log({key: [wandb.Image(im, caption=c) for im, c in zip(images, captions)]}))

    def log_artifact(self, name: str, type: str, files: dict[str, Path], metadata: dict | None = None) -> None:
        """An output of this run: ``files`` (name in the artifact -> local file; missing ones skipped).
        W&B copies them to its staging folder first, so later changes cannot corrupt an upload."""
        def log():
            art = _artifact(name, type, files, metadata)
            if art is not None:
                self.run.log_artifact(art)
        self._safe(log)

    def use_artifact(self, name: str, type: str, files: dict[str, Path]) -> None:
        """An input of this run, declared by content: the same files give the same digest, i.e. the
        version the producing run logged (or a new version if they changed since). Offline, where W&B
        cannot declare inputs, the run's config records them instead: ``input_artifacts``, name -> digest."""
        def use():
            # Read in place, not staged: inputs are usually already uploaded, and a copy of every
            # member checkpoint would only fill the staging folder.
            art = _artifact(name, type, files, None, policy="immutable")
            if art is None:
                return
            if self.run.offline:
                # wandb.Run.use_artifact refuses offline runs, and no other public call declares an input
                # (wandb 0.19.9 - 0.31); the digest names the very version, and `wandb sync` uploads the config.
                self._inputs[art.name] = art.digest
                self.run.config.update({"input_artifacts": dict(self._inputs)}, allow_val_change=True)
            else:
                self.run.use_artifact(art)  # uploads what the server lacks (usually nothing), then waits
        self._safe(use)

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


def artifact_name(kind: str, name: str) -> str:
    """``<kind>-<name>`` as a valid W&B artifact name (letters, digits, ``_ - .``; at most 128)."""
    out = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{kind}-{name}")
    if len(out) > 128:  # keep it unique: a hash of the whole name replaces the tail
        out = out[:115] + "-" + hashlib.sha1(out.encode()).hexdigest()[:12]
    return out


def _artifact(name: str, type: str, files: dict[str, Path], metadata: dict | None, policy: str = "mutable"):
    import wandb  # noqa: PLC0415 (wandb: the track extra)
    present = {k: Path(v) for k, v in files.items() if Path(v).is_file()}
    if not present:
        return None
    art = wandb.Artifact(artifact_name(type, name), type=type, metadata=_plain(metadata or {}))
    for k, v in sorted(present.items()):
        art.add_file(str(v), name=k, policy=policy)
    return art


def _plain(d: dict) -> dict:
    """Scalars only (artifact metadata), numpy scalars as Python ones."""
    out = {k: (v.item() if hasattr(v, "item") else v) for k, v in d.items()}
    return {k: v for k, v in out.items() if isinstance(v, (int, float, str, bool)) or v is None}


def fold_files(folder: Path) -> dict[str, Path]:
    """A fold's model artifact: its best.pt, metrics.json, config.yaml and the OOF store's summary
    (ids.json, meta.json; not the probabilities, which can be gigabytes)."""
    rp = paths.RunPaths("x", 0)  # only for the file names, which paths owns
    folder, oof = Path(folder), rp.oof().name
    return {**{p.name: folder / p.name for p in (rp.best, rp.metrics, rp.config)},
            **{f"{oof}/{n}": folder / oof / n for n in (paths.OOF_IDS, paths.OOF_META)}}


def _checkpoint_folds(members) -> list[tuple[str, Path]]:
    """(``<exp>-fold<k>`` or ``<exp>-all-data``, run folder) of every member checkpoint inside a run folder."""
    out = []
    for m in members:
        for c in m["checkpoints"]:
            folder = (paths.project() / c["path"]).parent
            rp = paths.RunPaths.of(folder)
            if rp is not None and (f"{rp.experiment}-{rp.label}", folder) not in out:
                out.append((f"{rp.experiment}-{rp.label}", folder))
    return out


# ------------------------------------------------------------------------------------------------ #
# One function per stage
# ------------------------------------------------------------------------------------------------ #
def for_training(exp, comp, fold: int | str, config: dict) -> Tracker:
    """job_type ``train`` (``tune`` for tuning trials), group = experiment (or ``tracking.group``:
    tuning sets the study), name ``<exp>-fold<k>`` (``<exp>-all-data``), tags competition and ``fold<k>``."""
    t = exp.tracking
    label = paths.fold_label(fold)
    return Tracker(t.wandb, **target(t, comp.name), group=t.group or exp.name, job_type=t.job_type or "train",
                   name=f"{exp.name}-{label}", tags=[comp.name[:64], label], config=config)


def log_parent(tracker: Tracker, checkpoint: Path, sha256: str | None = None) -> None:
    """A run started from another run's weights (``model.init_from``) declares them as its input: the
    parent run's model artifact when the checkpoint is a run folder's best.pt (the same files give the
    same digest, i.e. the version that run logged), else the file itself. Skipped when the file is gone
    or no longer the one the run started from (``sha256``, as config.yaml records it)."""
    path = Path(checkpoint)
    if tracker.run is None or not path.is_file() or (sha256 and file_hash(path, len(sha256)) != sha256):
        return
    rp = paths.RunPaths.of(path.parent)
    if rp is not None and path.name == rp.best.name:
        tracker.use_artifact(f"{rp.experiment}-{rp.label}", "model", fold_files(path.parent))
    else:
        tracker.use_artifact(f"init-{path.stem}", "model", {path.name: path})


def log_fold(tracker: Tracker, exp, fold: int, metrics: dict) -> None:
    """The fold's model artifact (after metrics.json is written). Tuning trials log none: a study
    would upload a checkpoint per trial; ensembling a trial's folds declares them then."""
    if tracker.run is None or exp.tracking.job_type == "tune":
        return
    rp = paths.run(exp.name, fold)
    tracker.log_artifact(f"{exp.name}-{rp.label}", "model", fold_files(rp.root),
                         {k: v for k, v in metrics.items() if not isinstance(v, (dict, list))})


def log_ensemble(recipe: dict, per_class: dict[str, float], files: tuple = (), cfg=None,
                 enabled: bool = True) -> None:
    """One W&B run per ensemble recipe: job_type ``ensemble``, group and name = the recipe's name; the
    recipe as config, a member-weights table, a per-class score table, the scores in the summary; its
    members' model artifacts as inputs, the recipe files (``files``: yaml, md) as artifact ``recipe-<name>``.

    ``recipe``: the recipe as plain data (``to_plain(Recipe)``); ``per_class``: class -> score;
    ``cfg``: the TrackingConfig where it goes (the first member's).
    """
    name, comp = str(recipe.get("name", "ensemble")), str(recipe.get("competition") or "competition")
    tr = Tracker(enabled, **target(cfg, comp), group=name, job_type="ensemble", name=name, tags=[comp[:64]],
                 config=recipe)
    if tr.run is None:
        return
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
    for fold_name, folder in _safe_list(lambda: _checkpoint_folds(recipe.get("members", []))):
        tr.use_artifact(fold_name, "model", fold_files(folder))
    tr.log_artifact(name, "recipe", {Path(f).name: Path(f) for f in files}, scores)
    tr.finish()


def log_submission(row: dict, recipe=None, source: Path | str | None = None) -> None:
    """One W&B run per submission: job_type ``submit``, group = the recipe's name, name = the CSV's;
    the ledger row as config and summary (so the dashboard can plot CV against LB), the CSV as artifact
    ``submission-<recipe>``, its input the recipe artifact (``source``: the recipe YAML) or, for a
    recipe made on the fly (``predict --exp``), the fold model artifacts. Tracked unless the first
    member's run config says ``tracking.wandb: false``."""
    row = _plain(row)  # numpy scalars from pandas
    file = Path(str(row.get("file") or row.get("submission") or row.get("name") or "submission.csv"))
    name = str(row.get("ensemble") or (recipe.name if recipe is not None else None) or file.stem)
    comp = str(row.get("competition") or (recipe.competition if recipe is not None else None) or "competition")
    cfg = _recipe_tracking(recipe) if recipe is not None else None
    tr = Tracker(cfg.wandb if cfg else True, **target(cfg, comp), group=name, job_type="submit", name=file.stem,
                 tags=[comp[:64]], config=row)
    if tr.run is None:
        return
    tr.summary(row)
    if source is not None:
        src = Path(source)
        tr.use_artifact(name, "recipe", {src.name: src, src.with_suffix(".md").name: src.with_suffix(".md")})
    elif recipe is not None:
        members = [m.model_dump() for m in recipe.members]
        for fold_name, folder in _safe_list(lambda: _checkpoint_folds(members)):
            tr.use_artifact(fold_name, "model", fold_files(folder))
    csv = file if file.is_absolute() else paths.project() / file
    tr.log_artifact(name, "submission", {csv.name: csv}, row)
    tr.finish()


def _recipe_tracking(recipe):
    """The TrackingConfig of the first member run whose config.yaml says one (else the defaults)."""
    for _, folder in _safe_list(lambda: _checkpoint_folds([m.model_dump() for m in recipe.members])):
        f = paths.RunPaths.of(folder).config
        try:
            return validate(TrackingConfig, read_yaml(f).get("experiment", {}).get("tracking", {}), f)
        except Exception:  # an unreadable or older config: the next member, or the defaults
            continue
    return TrackingConfig()


def _safe_list(fn) -> list:
    try:
        return fn()
    except Exception as e:
        warnings.warn(f"W&B lineage skipped: {type(e).__name__}: {e}")
        return []
