"""``python -m benchmarks pipeline [--rev REV] [--keep DIR]``: the README's default pipeline, timed.

A temporary clone of this repository (the committed ``HEAD``, or ``--rev``) runs, stage by stage, the
commands the Makefile's targets run on the embedded default competition:

    folds -> train-all baseline -> train-all unet3plus -> ensemble -> submit -> score (hidden test truth)

and prints each stage's wall time, the total and the submission's hidden-test score. The clone uses
this checkout's virtual environment (the venv is excluded from the timing), so ``--rev`` of an older
commit measures that commit's pipeline with the same command and packages: "today's" figure is
``--rev <commit>``. Not part of ``make bench`` (it takes minutes, not seconds). Only the load average
printed beside the figures tells whether they are a quiet machine's.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.harness import load

REPO = Path(__file__).resolve().parent.parent

# (stage, competition arguments); each runs as `python -m competition <arguments>` in the clone, as
# `make <target>` does (the Makefile adds only the venv check, which the shared venv makes moot).
STAGES = [
    ("make folds", ["folds"]),
    ("make train-all EXP=baseline", ["train", "--exp", "baseline", "--fold", "all"]),
    ("make train-all EXP=unet3plus", ["train", "--exp", "unet3plus", "--fold", "all"]),
    ("make ensemble", ["ensemble", "--name", "blend", "--method", "caruana", "baseline", "unet3plus"]),
    ("make submit", ["submit", "--ensemble", "blend", "--out", "submissions/pipeline.csv", "--no-progress"]),
    ("competition score", ["score", "submissions/pipeline.csv"]),
]


def clone(rev: str, dest: Path) -> str:
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(REPO), str(dest)], check=True)
    subprocess.run(["git", "-C", str(dest), "checkout", "-q", rev], check=True)
    return subprocess.run(["git", "-C", str(dest), "rev-parse", "--short", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()


def run_stage(args: list[str], cwd: Path, log: Path) -> tuple[float, str]:
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    t = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n$ competition {' '.join(args)}\n")
        f.flush()
        p = subprocess.run([sys.executable, "-m", "competition", *args], cwd=cwd, env=env, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        f.write(p.stdout)
    if p.returncode != 0:
        raise SystemExit(f"`competition {' '.join(args)}` failed (exit {p.returncode}); its output is in {log}:\n"
                         + "\n".join(p.stdout.splitlines()[-15:]))
    return time.perf_counter() - t, p.stdout


def hidden_score(score_output: str) -> float:
    m = re.search(r"(?m)^mean \S+ (\d\.\d+) over", score_output)
    if not m:
        raise SystemExit(f"could not read a score from `competition score`:\n{score_output}")
    return float(m.group(1))


def recipe_line(path: Path) -> str:
    """The recipe's native CV (in-sample and nested) and each experiment's share of the weights."""
    recipe = yaml.safe_load(path.read_text())
    share: dict[str, float] = {}
    for m in recipe["members"]:
        share[m["experiment"]] = share.get(m["experiment"], 0.0) + sum(m["weights"]) / len(m["weights"])
    cv = recipe["scores"]
    weights = ", ".join(f"{e} {w:.2f}" for e, w in share.items())
    return (f"recipe {path.name}: native CV in-sample {cv['in_sample']:.4f}, nested {cv['nested']:.4f}; "
            f"weights {weights} (an experiment not listed has weight 0)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks pipeline", description=__doc__.split("\n\n")[0])
    ap.add_argument("--rev", default="HEAD",
                    help="the commit to measure (default: HEAD; uncommitted edits are not seen)")
    ap.add_argument("--keep", default=None, help="run in this (new) folder and keep it, instead of a temp folder")
    args = ap.parse_args(argv)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="pipeline-"))
    if args.keep and work.exists() and any(work.iterdir()):
        raise SystemExit(f"--keep {work}: the folder exists and is not empty")
    try:
        rev = clone(args.rev, work / "clone")
        cwd, log = work / "clone", work / "pipeline.log"
        print(f"pipeline of {rev} in {cwd} (log: {log}); python {sys.executable}; [{load()}]", flush=True)
        times, total = [], 0.0
        out = ""
        for label, stage in STAGES:
            seconds, out = run_stage(stage, cwd, log)
            total += seconds
            times.append((label, seconds))
            print(f"  {label:<32} {seconds:7.1f} s   [{load()}]", flush=True)
        print(f"  {'total':<32} {total:7.1f} s  ({total / 60:.1f} min)")
        print(f"  hidden-test score of the submission: {hidden_score(out):.4f}   [{load()}]")
        print("  " + recipe_line(cwd / "ensembles" / "blend.yaml"))
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
