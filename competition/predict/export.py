"""``competition export``: a recipe's fold models as ONNX or TorchScript files, each checked against the
torch model it came from, plus ``export.json`` saying how to run them.

    <out>/<exp>-fold<k>.onnx | .pt    one file per checkpoint of the recipe (shared checkpoints once;
                                      <exp>-all-data.* for a full-data member)
    <out>/export.json                 per member: its files, input size, channels, normalisation, TTA views,
                                      scales and weights; the thresholds and post-processing; per file: the
                                      checkpoint it came from (sha256), the exporter used, the sizes checked
                                      and the largest |logit difference| found there

Default ``<out>``: ``runs/_export/<recipe>-<format>/``. Each network is exported at the input sizes it
meets in the recipe (the experiment's input size; other sizes only for TTA scales, quarter turns of a
non-square input or images kept at their native size), with the batch dimension dynamic. The exported
network maps the normalised image to LOGITS: the activation, TTA views and scales, sliding windows,
resizing, blending and thresholds are NOT folded in; the runner applies them around it with the very
code torch uses (:mod:`competition.predict.infer`, :mod:`competition.predict.tta`). Folding TTA in would
fix the batch layout and duplicate that code for a few flips, so it is listed, not folded.

Right after export every file is run on random inputs (3 images, each size the recipe needs) and
compared with the torch model in fp32: above ``RTOL`` x max(1, max |logit|) it is refused. ONNX goes
through ``torch.onnx.export(dynamo=True)`` first and, where that fails or its output differs, the
TorchScript-based exporter (``dynamo=False``); ``export.json`` records which was used and why.
"""
from __future__ import annotations

import contextlib
import io
import json
import tempfile
import time
import warnings
from pathlib import Path

import torch

from competition import paths
from competition.config import CompetitionConfig, Recipe, load_competition, load_recipe, to_plain
from competition.data.dataset import Geometry
from competition.data.transfer import MEAN, STD
from competition.errors import UserError
from competition.io import atomic_dir, file_hash, read_json
from competition.predict.members import (
    LoadedModel,
    build_from_checkpoint,
    check_recipe,
    checkpoint_labels,
    checkpoint_paths,
    member_weights,
    read_checkpoint,
)
from competition.predict.recipes import resolve_recipe
from competition.predict.runtime import OnnxNet, need
from competition.predict.tta import scaled_size

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
EXPORT_JSON = "export.json"
FORMAT = 1  # export.json's layout version
OPSET = 18
RTOL = 1e-3  # refuse an export whose logits differ by more than RTOL x max(1, max |logit|)
TTA_NOTE = ("listed, not folded in: the runner applies the views and scales around the exported network "
            "(competition.predict.tta, the code torch uses)")


class ExportError(UserError):
    """A model could not be exported, or its export does not reproduce the torch model."""


def network_sizes(exp, views, scales) -> list[tuple[int, int]] | None:
    """Every (h, w) the network meets when ``exp``'s model runs with these TTA views and scales (whole
    canvases or sliding windows, scaled, turned); None: any size (images kept at their native size)."""
    geo = Geometry.from_config(exp)
    if geo.policy == "crop" and not geo.crop_from:
        return None
    wh, ww = exp.data.input_hw
    ch, cw = geo.whole((wh, ww))
    base = (wh, ww) if ch > wh or cw > ww else (ch, cw)  # sliding windows of the input size, else the canvas
    turned = any(v in ("rot90", "rot270") for v in views)
    out = set()
    for s in scales:
        h, w = base if s == 1 else scaled_size(*base, s)
        out |= {(h, w), (w, h)} if turned else {(h, w)}
    return sorted(out)


def _union(a, b):
    return None if a is None or b is None else sorted(set(a) | set(b))


def _normalisation(comp: CompetitionConfig, exp) -> dict:
    c = comp.in_channels
    return {"scale": f"1/{65535 if comp.image.bit_depth == 16 else 255}", "mean": MEAN[c], "std": STD[c],
            "preprocess": [t.model_dump(mode="json") for t in exp.augment.preprocess]}


# --------------------------------------------------------------------------------------------- #
# One model
# --------------------------------------------------------------------------------------------- #
def _max_diff(model: torch.nn.Module, net, sizes: list[tuple[int, int]], in_ch: int) -> tuple[float, float]:
    """(max |net - model| over 3 random images at each size, the tolerance it is held to)."""
    g = torch.Generator().manual_seed(0)
    worst, scale = 0.0, 0.0
    for h, w in sizes:
        x = torch.randn(3, in_ch, h, w, generator=g)
        with torch.no_grad():
            ref, got = model(x).float(), net(x).float()
        if got.shape != ref.shape:
            raise ExportError(f"output shape {tuple(got.shape)} where torch gives {tuple(ref.shape)} at {h}x{w}")
        worst, scale = max(worst, float((got - ref).abs().max())), max(scale, float(ref.abs().max()))
    return worst, RTOL * max(1.0, scale)


def _quietly():
    """The exporters narrate every step on stdout and warn about every traced branch: keep the CLI's
    output to our own lines (a failure still raises, and its message is kept)."""
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    return stack


def _onnx(model: torch.nn.Module, x: torch.Tensor, path: Path, spatial: bool, dynamo: bool) -> None:
    axes = {0: "batch", **({2: "height", 3: "width"} if spatial else {})}
    kw: dict = {"input_names": ["image"], "output_names": ["logits"], "opset_version": OPSET, "dynamo": dynamo}
    if dynamo:
        dim = torch.export.Dim.DYNAMIC
        kw.update(dynamic_shapes=({k: dim for k in axes},), external_data=False, optimize=True)
    else:
        out_axes = {0: "batch", **({2: "out_height", 3: "out_width"} if spatial else {})}
        kw.update(dynamic_axes={"image": axes, "logits": out_axes})
    with _quietly():
        torch.onnx.export(model, (x,), str(path), **kw)


def export_model(model: torch.nn.Module, fmt: str, path: Path, sizes: list[tuple[int, int]], in_ch: int,
                 any_size: bool = False) -> dict:
    """Export ``model`` (eval, fp32, on the CPU) to ``path`` and check it at ``sizes`` (the input sizes the
    recipe needs; ``any_size``: images keep their native sizes, so height and width are dynamic too);
    returns the record for export.json."""
    t0 = time.time()
    spatial = any_size or len(sizes) > 1
    x = torch.randn(2, in_ch, *sizes[0], generator=torch.Generator().manual_seed(1))
    record: dict = {"format": fmt, "dynamic": ["batch"] + (["height", "width"] if spatial else []),
                    "sizes_checked": [list(s) for s in sizes]}
    if fmt == "torchscript":
        with _quietly(), torch.no_grad():  # torch 2.14 warns that torch.jit is deprecated (FutureWarning)
            torch.jit.save(torch.jit.trace(model, x, check_trace=False), str(path))
            net = torch.jit.load(str(path), map_location="cpu").eval()
        record["exporter"] = "torch.jit.trace"
        diff, tol = _max_diff(model, net, sizes, in_ch)
    else:
        diff = tol = None
        for name, dynamo in (("dynamo", True), ("torchscript", False)):
            try:
                _onnx(model, x, path, spatial, dynamo)
                diff, tol = _max_diff(model, OnnxNet(path, torch.device("cpu")), sizes, in_ch)
                if diff > tol:
                    raise ExportError(f"max |logit difference| {diff:.3g} > {tol:.3g}")
                record["exporter"] = name
                break
            except Exception as e:  # any failure of one exporter: try the next, and keep why
                first = (str(e).strip().splitlines() or [""])[0][:300]
                record.setdefault("fallback_reasons", {})[name] = f"{type(e).__name__}: {first}"
                diff = None
                path.unlink(missing_ok=True)
        if diff is None:
            raise ExportError("every ONNX exporter failed: " + "; ".join(
                f"{k}: {v}" for k, v in record["fallback_reasons"].items()))
        record["opset"] = OPSET
    if diff > tol:
        raise ExportError(f"the {fmt} export differs from the torch model: max |logit difference| {diff:.3g} > "
                          f"the tolerance {tol:.3g} ({RTOL:g} x max(1, max |logit|))")
    record.update(max_abs_diff=diff, tolerance=tol, seconds=round(time.time() - t0, 2))
    return record


# --------------------------------------------------------------------------------------------- #
# A recipe
# --------------------------------------------------------------------------------------------- #
def _plan(recipe: Recipe, root: Path, source: str) -> tuple[dict, list]:
    """{checkpoint path: [file stem, recipe sha256, experiment, sizes]} in recipe order, and per member
    the checkpoint path of each fold."""
    found = iter(checkpoint_paths(recipe, root, source))  # present, inside root, hashes checked
    plan: dict[Path, list] = {}
    per_member, stems = [], set()
    for m in recipe.members:
        mine = []
        for label, c in zip(checkpoint_labels(m), m.checkpoints):  # fold<k>, or all-data
            path = next(found)
            if path not in plan:
                _, exp = read_checkpoint(path, recipe.classes, recipe.task)
                stem, n = f"{m.experiment}-{label}", 2
                while stem in stems:
                    stem, n = f"{m.experiment}-{label}-{n}", n + 1
                stems.add(stem)
                plan[path] = [stem, c.sha256.lower(), exp, network_sizes(exp, m.tta, m.tta_scales)]
            else:
                plan[path][3] = _union(plan[path][3], network_sizes(plan[path][2], m.tta, m.tta_scales))
            mine.append(path)
        per_member.append(mine)
    return plan, per_member


def write_export(recipe: Recipe, comp: CompetitionConfig, root: Path, source: str, out: Path, fmt: str,
                 log=print) -> dict:
    """Export every checkpoint of ``recipe`` (paths relative to ``root``; ``source`` names the recipe in
    messages) into the folder ``out``, written whole or not at all; returns export.json's content."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        for module in ("onnx", "onnxruntime"):
            need(module, "competition export --format onnx")
    check_recipe(recipe, comp.classes, comp.task, source)
    plan, per_member = _plan(recipe, root, source)
    in_ch = comp.in_channels
    models, files = [], {}
    with atomic_dir(out) as tmp:
        for path, (stem, sha, exp, sizes) in plan.items():
            data, _ = read_checkpoint(path, recipe.classes, recipe.task)
            model = build_from_checkpoint(data, exp, path, len(recipe.classes), recipe.task, in_ch).float().cpu()
            wh, ww = exp.data.input_hw
            checked = sizes if sizes is not None else [(wh, ww), (wh + 32, ww + 32)]
            name = stem + FORMATS[fmt]
            try:
                rec = export_model(model, fmt, tmp / name, checked, in_ch, any_size=sizes is None)
            except ExportError as e:
                raise ExportError(f"{path}: {fmt} export of {exp.name} ({exp.model.arch}, {exp.model.encoder}): "
                                  f"{e}") from None
            rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
            models.append({"file": name, "sha256": file_hash(tmp / name, 64), "checkpoint": rel,
                           "checkpoint_sha256": file_hash(path, 64), "experiment": exp.name, **rec})
            files[path] = name
            log(f"  {name}: {rec['exporter']}, max |logit diff| {rec['max_abs_diff']:.2g} at "
                f"{', '.join(f'{h}x{w}' for h, w in checked)} (dynamic: {', '.join(rec['dynamic'])})")
        weights = member_weights(recipe, source)
        members = []
        for m, mine, w in zip(recipe.members, per_member, weights):
            exp = plan[mine[0]][2]
            members.append({
                "experiment": m.experiment, "folds": list(m.folds), "full_data": m.full_data,
                "files": [files[p] for p in mine],
                "input_size": list(exp.data.input_hw), "channels": in_ch, "normalisation": _normalisation(comp, exp),
                "resize": exp.data.resize, "policy": exp.data.policy, "crop_from": exp.data.crop_from,
                "output_scale": exp.model.output_scale, "tta": list(m.tta), "tta_scales": list(m.tta_scales),
                "weights": list(m.weights), "weights_normalised": [round(float(v), 6) for v in w]})
        doc = {"format": FORMAT, "made_by": "competition export", "export_format": fmt, "recipe": recipe.name,
               "competition": comp.name, "task": recipe.task, "classes": list(recipe.classes),
               "thresholds": list(recipe.thresholds),
               "postprocess": {k: to_plain(v) for k, v in recipe.postprocess.items()},
               "outputs": "logits (N, C, H*s, W*s): sigmoid per class (multilabel) or softmax over background "
                          "+ classes (multiclass), applied by the runner",
               "precision": "fp32", "tta_note": TTA_NOTE, "members": members, "models": models,
               "versions": _versions(fmt), "files": sorted(files.values()) + [EXPORT_JSON]}
        (tmp / EXPORT_JSON).write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def _versions(fmt: str) -> dict:
    out = {"torch": torch.__version__}
    if fmt == "onnx":
        for module in ("onnx", "onnxruntime", "onnxscript"):
            with contextlib.suppress(ImportError):
                out[module] = __import__(module).__version__
    return out


def check_out(out: Path) -> None:
    """``--out`` must be absent, an empty folder, or an export of ours (its export.json lists every entry)."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ExportError(f"--out {out}: is not a folder; choose a new or empty folder for the export")
    if not out.exists():
        return
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    try:
        listed = set(read_json(out / EXPORT_JSON, "export manifest")["files"])
    except (UserError, OSError, KeyError, TypeError):
        listed = set()
    foreign = [e for e in entries if e not in listed or (out / e).is_dir()]
    if foreign:
        raise ExportError(f"--out {out}: is not empty and is not an export made by competition export (replacing it "
                          f"would delete what it did not write): {', '.join(foreign[:5])} ({len(foreign)} in all); "
                          f"choose an empty or new folder")


def export_recipe(ensemble: str | None, fmt: str, out: Path | None = None, log=print) -> Path:
    """``competition export``: the recipe's models into ``out`` (default: :func:`competition.paths.export_dir`)."""
    source = resolve_recipe(ensemble)
    recipe = load_recipe(source)
    comp = load_competition(recipe.competition)
    out = Path(out) if out is not None else paths.export_dir(recipe.name, fmt)
    check_out(out)
    log(f"exporting {recipe.name} ({source}) to {fmt} in {out}")
    doc = write_export(recipe, comp, paths.project(), str(source), out, fmt, log)
    log(f"wrote {out}: {len(doc['models'])} {fmt} models, {EXPORT_JSON} (TTA {TTA_NOTE})")
    return out


# --------------------------------------------------------------------------------------------- #
# Reading an export back (--runtime onnx)
# --------------------------------------------------------------------------------------------- #
def read_export(folder: Path) -> dict:
    """export.json of ``folder``, checked: the layout version, and per model its file, hashes and sizes."""
    path = Path(folder) / EXPORT_JSON
    doc = read_json(path, "export manifest")
    try:
        ok = doc["format"] == FORMAT and doc["export_format"] in FORMATS and all(
            isinstance(m["file"], str) and "/" not in m["file"] and isinstance(m["sha256"], str)
            and isinstance(m["checkpoint_sha256"], str) and isinstance(m["sizes_checked"], list)
            and isinstance(m["dynamic"], list) for m in doc["models"])
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise ExportError(f"{path}: not an export manifest this version reads (format {FORMAT}); export again "
                          f"(competition export)")
    return doc


def _match(folder: Path, needed: dict) -> tuple[dict | None, str]:
    """({checkpoint path: model record}, "") when ``folder`` holds an ONNX export of every checkpoint in
    ``needed`` ({path: [recipe sha256, experiment, sizes]}) covering the sizes the recipe needs; else
    (None, why not)."""
    if not (folder / EXPORT_JSON).is_file():
        return None, f"no {folder / EXPORT_JSON}"
    doc = read_export(folder)
    if doc["export_format"] != "onnx":
        return None, f"{folder} holds a {doc['export_format']} export"
    out = {}
    for path, (sha, exp, sizes) in needed.items():
        rec = next((m for m in doc["models"] if m["checkpoint_sha256"].startswith(sha)), None)
        if rec is None:
            return None, f"{folder} has no export of {path} (sha256 {sha}): exported from other checkpoints"
        covered = "height" in rec["dynamic"] or (sizes is not None and
                                                 {tuple(s) for s in sizes} <= {tuple(s) for s in rec["sizes_checked"]})
        if not covered:
            return None, f"{folder}/{rec['file']} was exported for other input sizes than this recipe's TTA needs"
        file = folder / rec["file"]
        if not file.is_file() or file_hash(file, len(rec["sha256"])) != rec["sha256"]:
            raise ExportError(f"{file}: missing or changed since it was exported (sha256 differs from "
                              f"{folder / EXPORT_JSON}); export again (competition export)")
        out[path] = rec
    return out, ""


def load_onnx_models(recipe: Recipe, comp: CompetitionConfig, root: Path, source: str, device: torch.device,
                     log=print) -> list[list[LoadedModel]]:
    """Per member, its fold models as ONNX Runtime sessions (:class:`OnnxNet`), shaped like
    :func:`competition.predict.members.load_models`. The ONNX files come from ``<root>/onnx/`` (a bundle
    made with ``--runtime onnx``) or ``runs/_export/<recipe>-onnx/`` when they were exported from these very
    checkpoints; else the recipe is exported for this run into a temporary folder."""
    need("onnxruntime", "--runtime onnx")
    check_recipe(recipe, comp.classes, comp.task, source)
    found = iter(checkpoint_paths(recipe, root, source))
    needed: dict[Path, list] = {}
    order = []
    for m in recipe.members:
        mine = []
        for c in m.checkpoints:
            path = next(found)
            if path not in needed:
                needed[path] = [c.sha256.lower(), read_checkpoint(path, recipe.classes, recipe.task)[1], []]
                needed[path][2] = network_sizes(needed[path][1], m.tta, m.tta_scales)
            else:
                needed[path][2] = _union(needed[path][2], network_sizes(needed[path][1], m.tta, m.tta_scales))
            mine.append(path)
        order.append(mine)
    nets: dict[Path, LoadedModel] = {}
    for folder in (root / "onnx", paths.export_dir(recipe.name, "onnx")):
        records, _ = _match(folder, needed)
        if records is not None:
            log(f"--runtime onnx: {len(records)} ONNX models from {folder}")
            nets = {p: LoadedModel(folder / r["file"], needed[p][1], OnnxNet(folder / r["file"], device), None)
                    for p, r in records.items()}
            break
    else:
        t0 = time.time()
        with tempfile.TemporaryDirectory(prefix="competition-onnx-") as t:
            write_export(recipe, comp, root, source, Path(t) / "onnx", "onnx", log=lambda *_: None)
            records, why = _match(Path(t) / "onnx", needed)
            if records is None:
                raise ExportError(f"the ONNX export made for this run does not cover the recipe: {why}")
            # A session holds its model in memory: the temporary files can go once they are open.
            nets = {p: LoadedModel(p, needed[p][1], OnnxNet(Path(t) / "onnx" / r["file"], device), None)
                    for p, r in records.items()}
        log(f"--runtime onnx: exported {len(nets)} models to ONNX for this run ({time.time() - t0:.0f} s; "
            f"`competition export --ensemble {recipe.name}` keeps them for the next)")
    return [[nets[p] for p in mine] for mine in order]
