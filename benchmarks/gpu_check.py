"""The prepared GPU check (issue 14): one command, one JSON report, every CUDA path the product has.

    python benchmarks/gpu_check.py [--out gpu_check.json] [--cpu-smoke] [--recipes handbone-unet3plus-2048 ...]

On a GPU, in a temporary project folder holding the embedded full-size twin ``synthetic-hands-2048``:
1. per ``handbone-*`` recipe: one bf16 training step at the recipe's batch size (``train --dry-run``:
   seconds, images/s, peak CUDA memory);
2. per recipe: sliding-window + TTA inference at 2048² through the submission's member path
   (random init; images/s);
3. a 2-fold, 2-epoch mini pipeline end to end (folds, train, OOF, ensemble, submit, score) with the
   first recipe, so AMP, channels_last, GPU thresholding and the writer run on CUDA;
4. ``torchrun --nproc_per_node=1`` of one epoch (NCCL on a GPU, gloo on the CPU).
``--cpu-smoke`` runs the same steps at toy sizes on the CPU (CI): it proves the script, not the GPU.
Every step records its figures or its error; the script exits 1 if any step failed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Every hand-bone recipe in configs/experiments: a new one is checked without touching this list.
RECIPES = tuple(sorted(p.stem for p in (REPO / "configs/experiments").glob("handbone-*.yaml")))


def _project(smoke: bool) -> Path:
    """A temporary project: the repo's configs, the twin competition (toy-sized when smoking)."""
    import yaml
    root = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    shutil.copytree(REPO / "configs", root / "configs")
    comp_file = root / "configs/competitions/synthetic-hands-2048.yaml"
    comp = yaml.safe_load(comp_file.read_text())
    if smoke:
        comp["synthetic"].update(size=128, subjects=4, test_subjects=1)
    comp["folds"] = 2
    comp_file.write_text(yaml.safe_dump(comp, sort_keys=False))
    return root


def _cli(root: Path, *args: str, launcher: list[str] | None = None, timeout: int = 600) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    t0 = time.time()
    r = subprocess.run([*(launcher or [sys.executable, "-m"]), "competition", *args], cwd=root, env=env,
                       capture_output=True, text=True, timeout=timeout)
    out = {"command": " ".join(["competition", *args]), "exit": r.returncode, "seconds": round(time.time() - t0, 1),
           "tail": (r.stdout + r.stderr)[-1500:]}
    if r.returncode != 0:
        raise RuntimeError(json.dumps(out))
    return out


def _step(report: dict, name: str, fn) -> None:
    t0 = time.time()
    try:
        report["steps"][name] = {"ok": True, **fn(), "seconds": round(time.time() - t0, 1)}
    except Exception as e:  # recorded, and the next step still runs
        report["steps"][name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[-3000:],
                                 "traceback": traceback.format_exc()[-3000:]}
    print(f"{name}: {'ok' if report['steps'][name]['ok'] else 'FAILED'} ({time.time() - t0:.1f}s)", flush=True)


def _train_step(root: Path, recipe: str, smoke: bool) -> dict:
    extra = ["--batch-size", "1", "--input-size", "64", "--workers", "0"] if smoke else ["--workers", "4"]
    r = _cli(root, "train", "--exp", recipe, "--comp", "synthetic-hands-2048", "--fold", "0", "--dry-run", *extra)
    return {"dry_run": r["tail"]}


def _inference(root: Path, recipe: str, smoke: bool) -> dict:
    """Sliding-window + TTA through the submission's member path, random init, at the twin's size."""
    import torch

    from competition.config import load_competition, load_experiment
    from competition.data.adapters import make_adapter
    from competition.models import build_model
    from competition.models.precision import autocast_dtype
    from competition.predict.infer import MemberPredictor, TestInputs
    from competition.predict.members import LoadedModel
    cwd = os.getcwd()
    os.chdir(root)
    try:
        comp = load_competition("synthetic-hands-2048")
        exp = load_experiment(recipe, {"model.encoder_weights": None, "competition": comp.name,
                                       **({"data.input_size": 64, "data.crop_from": None, "data.policy": "resize",
                                           "model.output_scale": 1} if smoke else {})})
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = build_model(exp.model, comp.num_classes, 1, exp.data.input_hw).to(dev).eval()
        if dev.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
            torch.cuda.reset_peak_memory_stats()
        member = MemberPredictor([LoadedModel(Path("random"), exp, model, autocast_dtype("auto", dev))],
                                 comp.task, ["identity", "hflip"], [1.0], dev)
        adapter = make_adapter(comp)
        ids = adapter.test_ids[:2]
        ds = TestInputs(adapter, ids, {"in0": exp}, comp.task)
        t0 = time.time()
        for i in range(len(ds)):
            member(ds[i]["inputs"]["in0"][None], [adapter.image_size(ids[i], "test")])  # to the original size
        if dev.type == "cuda":
            torch.cuda.synchronize()
        sec = time.time() - t0
        return {"images": len(ids), "images_per_s": round(len(ids) / sec, 3), "device": str(dev),
                "input": list(ds[0]["inputs"]["in0"].shape),
                "peak_cuda_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev.type == "cuda" else None}
    finally:
        os.chdir(cwd)


def _mini_pipeline(root: Path, recipe: str, smoke: bool) -> dict:
    import yaml
    mini = {"extends": recipe, "name": "gpu-mini", "competition": "synthetic-hands-2048",
            "model": {"encoder_weights": None}, "train": {"epochs": 2, "progress": False},
            "scheduler": {"name": "cosine", "warmup_epochs": 0}, "tracking": {"wandb": False}}
    if smoke:  # a toy model of its own (not a recipe's) at toy sizes
        mini = {"name": "gpu-mini", "competition": "synthetic-hands-2048",
                "model": {"arch": "Unet", "encoder": "tu-test_resnet", "decoder_channels": [16, 16, 16, 16, 16]},
                "data": {"input_size": 64, "batch_size": 2, "workers": 0},
                "train": {"epochs": 2, "progress": False}, "scheduler": {"name": "cosine", "warmup_epochs": 0},
                "tracking": {"wandb": False}}
    (root / "configs/experiments/gpu-mini.yaml").write_text(yaml.safe_dump(mini, sort_keys=False))
    steps = [_cli(root, "folds", "--comp", "synthetic-hands-2048"),
             _cli(root, "train", "--exp", "gpu-mini", "--fold", "all", timeout=1200),
             _cli(root, "ensemble", "--name", "mini", "gpu-mini"),
             # --force: a toy model's masks may well be implausible; this measures the path, not the score
             _cli(root, "submit", "--ensemble", "mini", "--no-progress", "--out", "mini.csv", "--force"),
             _cli(root, "score", "--comp", "synthetic-hands-2048", "mini.csv")]
    return {"commands": [{k: s[k] for k in ("command", "seconds")} for s in steps],
            "score": steps[-1]["tail"].splitlines()[0] if steps[-1]["tail"] else None,
            "ensemble": steps[2]["tail"][-600:]}


def _torchrun(root: Path) -> dict:
    import torch
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node=1", "-m"]
    r = _cli(root, "train", "--exp", "gpu-mini", "--fold", "0", "--restart", "--set", "train.epochs=1",
             launcher=torchrun, timeout=900)
    return {"backend": backend, "seconds": r["seconds"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu_check.json", help="the JSON report (default gpu_check.json)")
    ap.add_argument("--cpu-smoke", action="store_true", help="toy sizes on the CPU: proves the script, not the GPU")
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES))
    args = ap.parse_args(argv)
    import torch
    sys.path.insert(0, str(REPO))
    report = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "cpu_smoke": args.cpu_smoke,
              "torch": torch.__version__, "cuda": torch.cuda.is_available(),
              "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "bf16": bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported()), "steps": {}}
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("no CUDA device: run with --cpu-smoke on a CPU machine", file=sys.stderr)
        return 2
    root = _project(args.cpu_smoke)
    try:
        _step(report, "folds", lambda: _cli(root, "folds", "--comp", "synthetic-hands-2048"))
        for recipe in args.recipes:
            _step(report, f"train_step/{recipe}", lambda r=recipe: _train_step(root, r, args.cpu_smoke))
            _step(report, f"inference/{recipe}", lambda r=recipe: _inference(root, r, args.cpu_smoke))
        _step(report, "mini_pipeline", lambda: _mini_pipeline(root, args.recipes[0], args.cpu_smoke))
        _step(report, "torchrun", lambda: _torchrun(root))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report["ok"] = all(s["ok"] for s in report["steps"].values())
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}: {'all steps ok' if report['ok'] else 'some steps FAILED'}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
