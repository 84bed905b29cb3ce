"""Offline inference bundle for code competitions: ``competition bundle ENSEMBLE --out DIR``.

    DIR/run.py                        python run.py --data-root /kaggle/input/<comp> [--out submission.csv]
    DIR/recipe.yaml                   the recipe; checkpoint paths point into checkpoints/, hashes re-taken
    DIR/competition.yaml              the competition config
    DIR/checkpoints/<exp>-fold<k>.pt  weights only: {"model": state_dict, "config": the resolved run config}
                                      (<exp>-all-data.pt for a full-data member)
    DIR/onnx/                         with --runtime onnx: every checkpoint exported to ONNX and checked, plus
                                      export.json (competition.predict.export); run.py then runs them with
                                      ONNX Runtime (--runtime torch there still runs the checkpoints)
    DIR/README.md
    DIR/plugins/                      only for a member whose model.arch is a plug-in import path
                                      (package.module:factory): its package folder (when it lives in the
                                      project folder) or module file; run.py puts plugins/ first on sys.path
    DIR/wheels/                       with --wheels: the package and every runtime dependency but torch and
                                      torchvision (--wheels-torch adds them); run.py pip-installs from it
                                      with --no-index
    DIR/.competition-bundle.json      the marker: {"format": 1, "recipe": name, "entries": [the top-level
                                      names written], "files": [every file and folder written, relative]}

The folder runs on a machine with no internet: models are rebuilt from the configs inside the
checkpoints, no pretrained weights are fetched, and the CSV is produced by the same code as
``competition submit`` (so it is byte-identical on the same device). Without ``wheels/`` the package
must be installed there already.

``--out`` must be absent, an empty folder, or a bundle this command wrote; anything else is refused
(naming what is in the way) and nothing is touched: replacing a bundle deletes the old folder, and
that must never delete a file of the user's. A bundle of ours is one with the marker whose every
entry, at any depth, is a file or folder the marker lists (a file the user added, even inside
checkpoints/, refuses the replacement). A bundle written before the marker existed (recipe.yaml, no
marker) is replaced only if it is exactly that version's layout: nothing at the top but run.py,
recipe.yaml, competition.yaml, checkpoints/, README.md and wheels/; run.py, recipe.yaml,
competition.yaml and checkpoints/ present; run.py the one ``competition bundle`` writes; only
``*.pt`` files in checkpoints/ and only wheels in wheels/. What else it holds is named in the
refusal; a folder that is not such a bundle at all is refused naming everything in it. The new
bundle is built in a temporary folder beside ``--out`` and swapped in by two renames (the old one
aside, the new one in), then the old one is deleted: a crash never leaves a half-written bundle
under the name (at worst the old one, whole, as the hidden ``.<name>.<random>.tmp.old`` beside it).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from email.parser import Parser
from importlib.metadata import version
from pathlib import Path

from packaging.requirements import Requirement

import competition
from competition import checkpoint as ckpt
from competition import paths
from competition.config import (
    CompetitionConfig,
    ConfigError,
    RecipeCheckpoint,
    dump_yaml,
    load_competition,
    load_recipe,
    read_yaml,
    to_plain,
    validate,
)
from competition.errors import UserError, describe_error
from competition.installs import closure
from competition.io import atomic_dir, file_hash
from competition.ledger import describe_members
from competition.models import resolve_arch, source_files
from competition.predict.export import EXPORT_JSON, write_export
from competition.predict.members import check_recipe, checkpoint_labels, checkpoint_paths, read_checkpoint
from competition.predict.options import Inference
from competition.predict.run import resolve_recipe, run_recipe
from competition.predict.runtime import RUNTIMES

RUN_PY = '''#!/usr/bin/env python3
"""Offline inference for ensemble {name!r}, made by `competition bundle`.

    python run.py --data-root /kaggle/input/<competition> [--out submission.csv] [--device auto] [--no-install]
                  [--runtime torch|onnx] [--compile]

With a wheels/ folder beside this file, the package and its dependencies are first pip-installed from
it with --no-index (no internet needed; what is already installed and satisfies them, such as Kaggle's
torch, is kept). Without one, the `competition` package must be installed already.
"""
import importlib
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if (HERE / "plugins").is_dir():  # plug-in architectures (model.arch: package.module:factory) the bundle carries
    sys.path.insert(0, str(HERE / "plugins"))


def install() -> None:
    wheels = HERE / "wheels"
    if not wheels.is_dir() or "--no-install" in sys.argv:
        return
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        "--no-index", "--find-links", str(wheels), "competition{extras}=={version}"])
    if r.returncode != 0:
        sys.exit("error: pip could not install the bundle from wheels/ (its message is above); torch and "
                 "torchvision come from the machine unless the bundle was made with --wheels-torch")
    importlib.invalidate_caches()


if __name__ == "__main__":
    install()
    from competition.predict.bundle import main
    raise SystemExit(main(HERE, sys.argv[1:]))
'''

README = """# Inference bundle: {name}

Made by `competition bundle` from `{source}` (competition `{competition}`).

    python run.py --data-root DATA_ROOT --out submission.csv [--device auto|cpu|cuda] [--batch-size N] [--force]
                  [--runtime torch|onnx] [--compile]

`DATA_ROOT` holds the competition's test images (and sample submission) in the layout of
`competition.yaml`. The CSV is validated before it is written. Checkpoints hold weights and the
resolved run config only; `recipe.yaml` lists their sha256, checked before use.

Members: {members}
TTA: {tta} at scales {scales}
Runtime: {runtime}
{wheels}"""

WHEELS_README = """
`wheels/` holds the package and every runtime dependency ({n} wheels, {mib:.0f} MiB{torch_note}); `run.py`
installs them with `pip install --no-index --find-links wheels` before it runs (`--no-install` skips that).
"""
PLUGINS_README = """
`plugins/` holds the plug-in architecture(s) the members' `model.arch` import ({names}); `run.py` puts
it first on `sys.path`.
"""
TORCH = frozenset({"torch", "torchvision"})  # preinstalled on Kaggle's GPU images, and GBs
MARKER = ".competition-bundle.json"
ONNX_DIR = "onnx"  # what --runtime onnx adds; load_onnx_models looks for <root>/onnx/ too
FORMAT = 1
# What a bundle made before the marker existed holds at its top (see the module docstring).
LEGACY = frozenset({"run.py", "recipe.yaml", "competition.yaml", "checkpoints", "README.md", "wheels"})
LEGACY_REQUIRED = frozenset({"run.py", "recipe.yaml", "competition.yaml", "checkpoints"})


def _relative(folder: Path) -> list[str]:
    """Every entry under ``folder`` (files, folders, links), as sorted relative POSIX paths."""
    out = []
    for root, dirs, files in os.walk(folder):
        base = Path(root).relative_to(folder)
        out += [(base / n).as_posix() for n in dirs + files]
    return sorted(out)


def _foreign(out: Path) -> list[str]:
    """What in the folder ``out`` a bundle of ours did not write (relative paths; [] = replaceable)."""
    entries = _relative(out)
    marker = out / MARKER
    if marker.is_file() and not marker.is_symlink():
        try:
            data = json.loads(marker.read_text())
            ours = set(data["files"]) | set(data["entries"]) | {MARKER}
            if data.get("format") != FORMAT or not isinstance(data["files"], list):
                raise ValueError
        except (OSError, ValueError, KeyError, TypeError):
            return [MARKER + " (not a marker this version reads)"]
        return [e for e in entries if e not in ours]
    top = sorted(p.name for p in out.iterdir())
    run_py = out / "run.py"
    try:
        ours = run_py.is_file() and not run_py.is_symlink() and \
            "made by `competition bundle`" in run_py.read_text()[:1000]
    except (OSError, UnicodeDecodeError):
        ours = False
    if not ours or not LEGACY_REQUIRED <= set(top):
        return top  # not a bundle: nothing in it is known to be ours
    foreign = [e for e in top if e not in LEGACY]
    for e in entries:
        p = out / e
        if e in LEGACY:
            if p.is_symlink() or not (p.is_dir() if e in ("checkpoints", "wheels") else p.is_file()):
                foreign.append(e)
        elif e.startswith(("checkpoints/", "wheels/")):
            folder, _, name = e.partition("/")
            if "/" in name or p.is_symlink() or not p.is_file() or \
                    not name.endswith(".pt" if folder == "checkpoints" else ".whl"):
                foreign.append(e)
    return foreign


def check_out(out: Path) -> None:
    """Refuse ``--out`` unless it is absent, an empty folder or a bundle of ours (module docstring)."""
    out = Path(out)
    if out.is_symlink():
        raise ConfigError(f"--out {out}: is a symbolic link; give the folder itself (absent, empty, or a "
                          f"bundle made by competition bundle)")
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"--out {out}: is a file, not a folder; choose a new or empty folder for the bundle")
    foreign = _foreign(out)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ConfigError(f"--out {out}: is not empty and is not a bundle made by competition bundle (replacing "
                          f"it would delete what the bundle did not write): {shown} ({len(foreign)} in all); "
                          f"choose an empty or new folder for --out, or remove them")


def make_bundle(ensemble: str | None, out: Path, log=print, wheels: bool = False, wheels_torch: bool = False,
                wheels_python: str | None = None, runtime: str = "torch") -> Path:
    """Pack the recipe's checkpoints (weights only), the recipe, the competition config and run.py;
    with ``wheels`` also wheels/ (see :func:`build_wheels`; ``wheels_torch`` or ``wheels_python`` imply it);
    with ``runtime`` onnx also onnx/, the checkpoints exported and checked (run.py's default runtime then)."""
    wheels = wheels or wheels_torch or wheels_python is not None
    if runtime not in RUNTIMES:
        raise ConfigError(f"--runtime {runtime}: expected one of {', '.join(RUNTIMES)}")
    if wheels_python is not None and not re.fullmatch(r"3\.\d+", wheels_python):
        raise ConfigError(f"--wheels-python {wheels_python!r}: expected a Python version such as 3.11")
    out = Path(out)
    check_out(out)  # first: what is in the way costs nothing to find
    source = resolve_recipe(ensemble)
    recipe = load_recipe(source)
    comp = load_competition(recipe.competition)
    check_recipe(recipe, comp.classes, comp.task, str(source))
    sources = iter(checkpoint_paths(recipe, paths.project(), str(source)))  # hashes checked here
    with atomic_dir(out) as tmp:  # the old bundle is replaced only by a whole new one
        (tmp / "checkpoints").mkdir()
        members, used, plugins = [], set(), {}
        for m in recipe.members:
            cks = []
            for label in checkpoint_labels(m):  # fold<k> per fold, or all-data (a full-data member)
                data, exp = read_checkpoint(next(sources), recipe.classes, recipe.task)
                plugins.update(_plugin_source(exp.model.arch, f"{source}: member {m.experiment}", log))
                name = f"{m.experiment}-{label}.pt"
                n = 2
                while name in used:
                    name, n = f"{m.experiment}-{label}-{n}.pt", n + 1
                used.add(name)
                ckpt.save({"model": data["model"], "config": data["config"]}, tmp / "checkpoints" / name)
                cks.append(RecipeCheckpoint(path=f"checkpoints/{name}", sha256=file_hash(tmp / "checkpoints" / name)))
            members.append(m.model_copy(update={"checkpoints": cks}))
        bundled = recipe.model_copy(update={"members": members})
        dump_yaml(bundled, tmp / "recipe.yaml")
        _copy_plugins(plugins, tmp / "plugins")
        if runtime == "onnx":
            log("exporting the checkpoints to ONNX (onnx/)")
            write_export(bundled, comp, tmp, str(tmp / "recipe.yaml"), tmp / ONNX_DIR, "onnx", log)
        dump_yaml(to_plain(comp), tmp / "competition.yaml")
        extras = "[export]" if runtime == "onnx" else ""  # onnxruntime comes with the export extra
        (tmp / "run.py").write_text(RUN_PY.format(name=recipe.name, version=version("competition"), extras=extras))
        note = ""
        if wheels:
            found = build_wheels(tmp / "wheels", wheels_torch, wheels_python, log, extras=("export",) if extras else ())
            note = WHEELS_README.format(n=len(found), mib=_mib(tmp / "wheels"), torch_note=(
                ", torch and torchvision included" if wheels_torch else
                "; not torch and torchvision: they must be installed where it runs, as on Kaggle's images"))
        (tmp / "README.md").write_text(README.format(
            name=recipe.name, source=source, competition=comp.name, members=describe_members(recipe),
            tta="; ".join(f"{m.experiment}: {', '.join(m.tta)}" for m in recipe.members),
            scales="; ".join(f"{m.experiment}: {', '.join(f'{s:g}' for s in m.tta_scales)}" for m in recipe.members),
            runtime="ONNX Runtime on onnx/ (export.json lists the files, sizes, TTA and checks); "
                    "--runtime torch runs checkpoints/" if runtime == "onnx" else "torch (checkpoints/)",
            wheels=note + (PLUGINS_README.format(names=", ".join(sorted(plugins))) if plugins else "")))
        (tmp / MARKER).write_text(json.dumps({
            "format": FORMAT, "recipe": recipe.name, "made_by": f"competition {version('competition')}",
            "entries": sorted(p.name for p in tmp.iterdir()) + [MARKER], "files": _relative(tmp)}, indent=1) + "\n")
        check_out(out)  # again: it may have changed while we built
    extra = (f", wheels/ ({len(list((out / 'wheels').glob('*.whl')))} wheels, {_mib(out / 'wheels'):.0f} MiB)"
             if wheels else "")
    if runtime == "onnx":
        extra += f", onnx/ ({len(used)} ONNX models, {_mib(out / ONNX_DIR):.1f} MiB)"
    extra += f", plugins/ ({', '.join(sorted(plugins))})" if plugins else ""
    log(f"wrote bundle {out}: {len(used)} checkpoints ({_mib(out / 'checkpoints'):.1f} MiB), recipe.yaml, "
        f"competition.yaml, run.py{extra}; {_mib(out):.0f} MiB in all")
    return out


def _plugin_source(arch: str, what: str, log) -> dict[str, Path]:
    """{name in plugins/: file or folder} for a plug-in import path; {} for anything else (an entry
    point is noted: its distribution must be installed where the bundle runs)."""
    try:
        found = source_files(arch)
    except ConfigError as e:
        raise ConfigError(f"{what}: {e}") from None
    if found is None and resolve_arch(arch).info.get("plugin") == "entry point":
        log(f"{what}: model.arch {arch!r} is an installed entry point ({resolve_arch(arch).info['source']}); the "
            f"bundle does not carry it: install its distribution where the bundle runs")
    return dict([found]) if found else {}


def _copy_plugins(plugins: dict[str, Path], dest: Path) -> None:
    """The plug-ins' package folders and module files into ``dest`` (plugins/), without bytecode."""
    for name, src in plugins.items():
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            dest.mkdir(exist_ok=True)
            shutil.copy2(src, dest / name)


def _extra_requirements(requires: list[str], extras: tuple[str, ...]) -> list[str]:
    """The requirements only ``extras`` add (``onnxruntime; extra == "export"``), without that marker."""
    out = []
    for r in requires:
        req = Requirement(r)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}) and \
                any(req.marker.evaluate({"extra": e}) for e in extras):
            req.marker = None
            out.append(str(req))
    return out


def _mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def _pip(*args: str) -> None:
    r = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if r.returncode != 0:
        tail = "; ".join(ln.strip() for ln in (r.stderr or r.stdout).strip().splitlines()[-4:])
        raise UserError(f"pip {args[0]} failed while building wheels/ (it needs the package index): {tail}")


def build_wheels(dest: Path, with_torch: bool = False, python: str | None = None, log=print,
                 extras: tuple[str, ...] = ()) -> dict[str, str]:
    """``dest``: the package's wheel, built from its source tree, and one wheel per runtime dependency at
    the version installed here (the versions the checkpoints were made and checked with), downloaded
    with ``pip download`` (needs the index now). torch and torchvision, and what only they need, are
    left out unless ``with_torch``. ``python`` ("3.12"): wheels for that Python instead of this one.
    Returns {distribution: version} of the dependencies."""
    root = Path(competition.__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        raise ConfigError(f"--wheels builds the package from its source, and {root} has no pyproject.toml: "
                          "run it from a clone (pip install -e .)")
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="competition-wheel-") as t:
        src = Path(t) / "src"  # a clean copy: the build writes nothing into the working tree
        shutil.copytree(root / "competition", src / "competition",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        for f in ("pyproject.toml", "README.md"):
            shutil.copy2(root / f, src / f)
        log("building the package's wheel")
        _pip("wheel", "--quiet", "--no-deps", "--wheel-dir", str(dest), str(src))
    own = sorted(dest.glob("competition-*.whl"))[-1]
    with zipfile.ZipFile(own) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        requires = Parser().parsestr(z.read(meta).decode()).get_all("Requires-Dist") or []
    requires += _extra_requirements(requires, extras)  # closure() leaves out what only an extra needs
    env = {"python_version": python, "python_full_version": f"{python}.0"} if python else None
    pins = closure(requires, skip=frozenset() if with_torch else TORCH, env=env)
    log(f"downloading {len(pins)} wheels (pip download)")
    target = ["--python-version", python] if python else []
    _pip("download", "--quiet", "--no-deps", "--only-binary=:all:", "--dest", str(dest), *target,
         *(f"{n}=={v}" for n, v in pins.items()))
    return pins


def run_bundle(folder: Path, data_root: str | None = None, out: Path = Path("submission.csv"),
               inference: Inference = Inference()):
    """Inference from a bundle folder: the CSV at ``out`` (validated, written atomically; one that
    cannot be right is refused unless ``inference.force``, as ``competition submit`` does)."""
    folder = Path(folder).resolve()
    comp_file = folder / "competition.yaml"
    data = read_yaml(comp_file)
    if data_root is not None:
        data["data_root"] = str(Path(data_root).expanduser().resolve())
    comp = validate(CompetitionConfig, data, comp_file)
    recipe = load_recipe(folder / "recipe.yaml")
    return run_recipe(recipe, comp, folder, Path(out), str(folder / "recipe.yaml"), inference)


def main(folder: Path, argv: list[str]) -> int:
    """The bundle's ``run.py``."""
    ap = argparse.ArgumentParser(prog="run.py", description=f"offline inference from the bundle {folder}")
    ap.add_argument("--data-root", default=None, help="the competition data folder (default: competition.yaml's)")
    ap.add_argument("--out", default="submission.csv", help="the CSV to write (default: submission.csv)")
    ap.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--no-install", action="store_true", help="do not pip-install wheels/ first (run.py reads it)")
    ap.add_argument("--force", action="store_true",
                    help="write the CSV even where it cannot be right (the checks of competition submit --force)")
    exported = (Path(folder) / ONNX_DIR / EXPORT_JSON).is_file()
    ap.add_argument("--runtime", choices=RUNTIMES, default="onnx" if exported else "torch",
                    help="torch: the checkpoints; onnx: ONNX Runtime (default when the bundle has onnx/)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the networks (--runtime torch; a GPU)")
    args = ap.parse_args(argv)
    try:
        inference = Inference(device=args.device, batch_size=args.batch_size, workers=args.workers,
                              progress=not args.no_progress, force=args.force, runtime=args.runtime,
                              compile=args.compile)
        r = run_bundle(folder, args.data_root, Path(args.out), inference)
    except (UserError, OSError) as e:
        print(f"error: {describe_error(e)}", file=sys.stderr)
        return 2
    print(f"wrote {r.path}: {r.rows} rows, {r.images} images in {r.seconds:.1f}s ({r.images_per_s:.2f} img/s)")
    return 0
