"""Offline inference bundle for code competitions: ``competition bundle ENSEMBLE --out DIR``.

    DIR/run.py                        python run.py --data-root /kaggle/input/<comp> [--out submission.csv]
    DIR/recipe.yaml                   the recipe; checkpoint paths point into checkpoints/, hashes re-taken
    DIR/competition.yaml              the competition config
    DIR/checkpoints/<exp>-fold<k>.pt  weights only: {"model": state_dict, "config": the resolved run config}
    DIR/README.md

The folder runs on a machine with no internet and only the package installed: models are rebuilt
from the configs inside the checkpoints, no pretrained weights are fetched, and the CSV is produced by
the same code as ``competition submit`` (so it is byte-identical on the same device).
"""
from __future__ import annotations

from competition.errors import UserError

import argparse
import shutil
import tempfile
import sys
from pathlib import Path

from competition.config import (CompetitionConfig, ConfigError, RecipeCheckpoint, dump_yaml, load_competition,
                                load_recipe, read_yaml, to_plain, validate)
from competition.predict.members import check_recipe, checkpoint_paths, read_checkpoint
from competition.train import checkpoint as ckpt

RUN_PY = '''#!/usr/bin/env python3
"""Offline inference for ensemble {name!r}, made by `competition bundle`.

    python run.py --data-root /kaggle/input/<competition> [--out submission.csv] [--device auto]

Needs only the `competition` package installed (no internet, no project folder).
"""
import sys
from pathlib import Path

from competition.predict.bundle import main

if __name__ == "__main__":
    raise SystemExit(main(Path(__file__).resolve().parent, sys.argv[1:]))
'''

README = """# Inference bundle: {name}

Made by `competition bundle` from `{source}` (competition `{competition}`).

    python run.py --data-root DATA_ROOT --out submission.csv [--device auto|cpu|cuda] [--batch-size N]

`DATA_ROOT` holds the competition's test images (and sample submission) in the layout of
`competition.yaml`. The CSV is validated before it is written. Checkpoints hold weights and the
resolved run config only; `recipe.yaml` lists their sha256, checked before use.

Members: {members}
TTA: {tta} at scales {scales}
"""


def make_bundle(ensemble: str | None, out: Path, log=print) -> Path:
    """Pack the recipe's checkpoints (weights only), the recipe, the competition config and run.py."""
    from competition.ledger import describe_members
    from competition.predict.run import resolve_recipe
    source = resolve_recipe(ensemble)
    recipe = load_recipe(source)
    comp = load_competition(recipe.competition)
    check_recipe(recipe, comp.classes, comp.task, str(source))
    sources = iter(checkpoint_paths(recipe, Path.cwd(), str(source)))  # hashes checked here
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "recipe.yaml").is_file():
        raise ConfigError(f"{out}: exists and is not a bundle; choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))  # unique per process
    (tmp / "checkpoints").mkdir(parents=True)
    members, used = [], set()
    try:
        for m in recipe.members:
            cks = []
            for fold in m.folds:
                data, _ = read_checkpoint(next(sources), recipe.classes, recipe.task)
                name = f"{m.experiment}-fold{fold}.pt"
                n = 2
                while name in used:
                    name, n = f"{m.experiment}-fold{fold}-{n}.pt", n + 1
                used.add(name)
                ckpt.save({"model": data["model"], "config": data["config"]}, tmp / "checkpoints" / name)
                cks.append(RecipeCheckpoint(path=f"checkpoints/{name}", sha256=ckpt.file_hash(tmp / "checkpoints" / name)))
            members.append(m.model_copy(update={"checkpoints": cks}))
        bundled = recipe.model_copy(update={"members": members})
        dump_yaml(bundled, tmp / "recipe.yaml")
        dump_yaml(to_plain(comp), tmp / "competition.yaml")
        (tmp / "run.py").write_text(RUN_PY.format(name=recipe.name))
        (tmp / "README.md").write_text(README.format(
            name=recipe.name, source=source, competition=comp.name, members=describe_members(recipe),
            tta="; ".join(f"{m.experiment}: {', '.join(m.tta)}" for m in recipe.members),
            scales="; ".join(f"{m.experiment}: {', '.join(f'{s:g}' for s in m.tta_scales)}" for m in recipe.members)))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = sum(p.stat().st_size for p in (out / "checkpoints").iterdir())
    log(f"wrote bundle {out}: {len(used)} checkpoints ({size / 2**20:.1f} MiB), recipe.yaml, competition.yaml, run.py")
    return out


def run_bundle(folder: Path, data_root: str | None = None, out: Path = Path("submission.csv"),
               device: str = "auto", batch_size: int | None = None, workers: int | None = None,
               progress: bool = True):
    """Inference from a bundle folder: the CSV at ``out`` (validated, written atomically)."""
    from competition.predict.run import run_recipe
    folder = Path(folder).resolve()
    comp_file = folder / "competition.yaml"
    data = read_yaml(comp_file)
    if data_root is not None:
        data["data_root"] = str(Path(data_root).expanduser().resolve())
    comp = validate(CompetitionConfig, data, comp_file)
    recipe = load_recipe(folder / "recipe.yaml")
    return run_recipe(recipe, comp, folder, Path(out), str(folder / "recipe.yaml"), device, batch_size,
                      workers, progress=progress)


def main(folder: Path, argv: list[str]) -> int:
    """The bundle's ``run.py``."""
    ap = argparse.ArgumentParser(prog="run.py", description=f"offline inference from the bundle {folder}")
    ap.add_argument("--data-root", default=None, help="the competition data folder (default: competition.yaml's)")
    ap.add_argument("--out", default="submission.csv", help="the CSV to write (default: submission.csv)")
    ap.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        r = run_bundle(folder, args.data_root, Path(args.out), args.device, args.batch_size, args.workers,
                       progress=not args.no_progress)
    except (UserError, OSError) as e:
        from competition.cli import describe_error
        print(f"error: {describe_error(e)}", file=sys.stderr)
        return 2
    print(f"wrote {r.path}: {r.rows} rows, {r.images} images in {r.seconds:.1f}s ({r.images_per_s:.2f} img/s)")
    return 0
