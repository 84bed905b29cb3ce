"""``competition init``: draft the config from the folder, check it through the real adapter, write it."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from competition import paths
from competition.config import CompetitionConfig, ConfigError, ExperimentConfig, config_dirs, validate
from competition.data.adapters import make_adapter
from competition.data.alignment import check_pixel_order
from competition.data.folder import IMAGE_EXTS
from competition.durations import parse_budget
from competition.errors import UserError
from competition.init.budget import MIN_EPOCHS
from competition.init.budget import apply as apply_plan
from competition.init.budget import plan as budget_plan
from competition.init.common import SAMPLE, InitError
from competition.init.decide import (
    decide_classes,
    decide_groups,
    decide_images,
    decide_pixel_order,
    decide_submission,
    decide_task,
    starter_experiment,
)
from competition.init.layouts import FINDERS
from competition.init.render import DOC, EXP_DOC, Draft, _checked, _ordered, render
from competition.init.scan import _spread, scan
from competition.io import atomic_write_text
from competition.paths import NAME_RULE, is_safe_name
from competition.predict.submit import expected_rows


# --------------------------------------------------------------------------------------------- #
# The command
# --------------------------------------------------------------------------------------------- #
@dataclass
class InitResult:
    competition: Path
    experiment: Path
    config: CompetitionConfig
    decided: list[str]
    undecided: list[str]
    problems: list[str]  # the data did not load with the config: it needs an edit before `make folds`
    plan: str | None = None  # the starter's measured cost (and the budget it was planned for)

    def format(self) -> str:
        lines = [f"wrote {self.competition}", f"wrote {self.experiment}", "decided:"]
        lines += [f"  {x}" for x in self.decided]
        if self.undecided:
            lines.append("could not decide (check these in the config):")
            lines += [f"  {x}" for x in self.undecided]
        if self.plan:
            lines.append(f"plan: {self.plan}")
        if self.problems:
            lines.append("PROBLEMS (edit the config before `make folds`):")
            lines += [f"  {x}" for x in self.problems]
        lines.append(f"next: competition folds --comp {self.config.name} && competition train --exp "
                     f"{self.config.name}-baseline --fold 0   (make folds COMP={self.config.name} && make train "
                     f"EXP={self.config.name}-baseline FOLD=0)")
        return "\n".join(lines)


def _default_name(root: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9_.+@-]+", "-", root.name).strip(".-")
    if not is_safe_name(name):
        raise ConfigError(f"cannot make a competition name from the folder name {root.name!r}; pass --name "
                          f"({NAME_RULE})")
    return name


def _data_root(root: Path) -> str:
    cwd = paths.project().resolve()
    return root.relative_to(cwd).as_posix() if root == cwd or cwd in root.parents else str(root)


def draft(root: Path, name: str) -> tuple[Draft, list[tuple[int, int]]]:
    """The competition config for the data in ``root``, checked through its adapter."""
    files = scan(root)
    if not files.images:
        raise InitError(f"{root}: no image files found (looked for {', '.join(sorted(IMAGE_EXTS))})")
    d = Draft()
    d.set("name", name)
    d.set("data_root", _data_root(root))
    lay = next((found for find in FINDERS.values() if (found := find(files, d)) is not None), None)
    if lay is None and files.unreadable:  # most likely the labels themselves: name the file and why
        rel, why = next(iter(files.unreadable.items()))
        more = f" ({len(files.unreadable) - 1} more CSV(s) unreadable too)" if len(files.unreadable) > 1 else ""
        raise InitError(f"{why}{more}; competition init could not read it, and found no layout it recognises "
                        f"without it")
    if lay is None:
        raise InitError(f"{root}: not a layout competition init recognises: no JSON polygon labels "
                        f"(<labels>/<group>/<image>.json), no CSV with an RLE column naming the images of a folder, "
                        f"and no folder of masks named like the images of another folder")
    decide_classes(files, lay, d)
    values = d.get("classes")
    names = list(values.values()) if isinstance(values, dict) else list(values)
    written = [str(k) for k in values] if isinstance(values, dict) else names
    if isinstance(values, dict) and d.get("ignore.value") is not None:
        written.append(str(d.get("ignore.value")))
    sizes = decide_images(files, lay, d)
    decide_groups(files, lay, d)
    if lay.format == "rle_csv":
        decide_pixel_order(files, lay, d)
    decide_submission(files, lay, d, written)
    for rel, why in files.unreadable.items():  # read to look for classes, groups or a sample submission
        d.undecided.append(f"{why}; init did not use it: if it holds classes, groups or the sample submission, "
                           f"fix it and run init again with --force")
    d.set("stratify.by", "class_presence")
    d.set("metric.name", "dice")
    d.set("metric.empty_score", 1.0, "check the competition's rules for empty truth and prediction")
    d.set("tta", ["identity", "hflip"], "no vertical flips or rotations until you know the data allows them")
    d.set("folds", 5)
    d.set("fold_seed", 42)
    try:
        decide_task(lay, d)
        check(_checked(d), d)
    except UserError as e:
        d.problems.append(f"the data does not load with this config yet: {e}")
    return d, sizes


def check(cfg: CompetitionConfig, d: Draft) -> None:
    """Groups, every label and the sample submission read through the adapter, as `make folds` and
    `submit` will read them; ``folds`` is fitted to the number of groups."""
    adapter = make_adapter(cfg)
    n_groups = len(set(adapter.groups().values()))
    d.set("folds", max(2, min(5, n_groups)), f"{n_groups} groups")
    d.decided.insert(0, f"{cfg.format}: {len(adapter.ids)} training images, {len(adapter.test_ids)} test images, "
                        f"{n_groups} groups ({cfg.groups.source}), {cfg.num_classes} classes "
                        f"({', '.join(cfg.classes)}), {cfg.task}")
    adapter.validate_labels()
    check_pixel_order(cfg, adapter)  # as `make folds` will: masks that fit their images better transposed
    for i in _spread(adapter.ids, SAMPLE):
        adapter.presence(i)
    if adapter.test_ids:
        expected_rows(cfg, adapter)


def init(data_dir: str | Path, name: str | None = None, force: bool = False, budget: str | None = None,
         gpus: int = 1) -> InitResult:
    """Write the competition config and its starter experiment; ``budget`` (``30m``, ``4h``) plans the
    starter to it (:mod:`competition.init.budget`), else its expected time is measured and stated."""
    budget_s = parse_budget(budget) if budget is not None else None  # a typo costs nothing
    root = Path(data_dir).expanduser().resolve()
    if not root.is_dir():
        raise InitError(f"{data_dir}: no such folder")
    name = name or _default_name(root)
    if not is_safe_name(name):
        raise ConfigError(f"--name {name!r}: use {NAME_RULE}")
    comp_path = config_dirs("competitions")[0] / f"{name}.yaml"
    exp_path = config_dirs("experiments")[0] / f"{name}-baseline.yaml"
    existing = [p for p in (comp_path, exp_path) if p.exists()]
    if existing and not force:
        raise ConfigError(f"{', '.join(map(str, existing))} exist(s); pass --force to overwrite")
    d, sizes = draft(root, name)
    data = _ordered(d.data)
    cfg = validate(CompetitionConfig, data, comp_path)
    exp, exp_why = starter_experiment(name, sizes)
    validate(ExperimentConfig, {"name": f"{name}-baseline", **exp}, exp_path)
    planned = None
    if not d.problems:  # measured through the real adapter and training code: only data that loads
        planned = budget_plan(exp, cfg, make_adapter(cfg), budget_s, gpus)
        exp, exp_why = apply_plan(exp, exp_why, planned)
        if planned.candidate.folds != cfg.folds:
            d.set("folds", planned.candidate.folds, f"planned for --budget: {cfg.folds} folds did not afford "
                                                    f"{MIN_EPOCHS} epochs at input {planned.tried[0][0]}")
            data = _ordered(d.data)
            cfg = validate(CompetitionConfig, data, comp_path)
        validate(ExperimentConfig, {"name": f"{name}-baseline", **exp}, exp_path)
    elif budget_s is not None:
        d.undecided.append("--budget: not planned, the data does not load with this config yet (see PROBLEMS)")
    doc = dict(DOC)
    if isinstance(data["classes"], dict):
        doc["classes"] = ("{value: name}: the value is how the labels, the sample submission and the submission "
                          "write the class; tables, W&B and plots show the name")
    header = [f"Competition {name}, written by `competition init {data_dir}`. Check the keys marked NOT",
              "DECIDED or guess. Every key is documented in docs/competitions.md and the configuration reference."]
    comp_text = render(data, doc, d.why, header) + "\n"
    exp_header = [f"Starter experiment for {name}, written by `competition init`: a small U-Net, random init,",
                  "CPU-friendly. Variants: a new file with `extends: " + f"{name}-baseline` and the keys that change."]
    if planned is not None:
        exp_header.append(f"Plan: {planned.note()}.")
    exp_text = render(exp, EXP_DOC, exp_why, exp_header) + "\n"
    assert yaml.safe_load(comp_text) == data and yaml.safe_load(exp_text) == exp  # the comments hide nothing
    atomic_write_text(comp_path, comp_text)
    atomic_write_text(exp_path, exp_text)
    return InitResult(comp_path, exp_path, cfg, d.decided, d.undecided, d.problems,
                      planned.note() if planned is not None else None)
