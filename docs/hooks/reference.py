"""mkdocs hook: ``reference.md``, every configuration key with its type and default, generated from the
pydantic models in ``competition/config.py`` at build time, so the reference cannot go stale."""
from __future__ import annotations

import re
import typing

from mkdocs.structure.files import File
from pydantic import BaseModel

from competition.config import CompetitionConfig, ExperimentConfig, Recipe, SearchSpace

MODELS = [("Competition", "configs/competitions/<name>.yaml", CompetitionConfig),
          ("Experiment", "configs/experiments/<exp>.yaml", ExperimentConfig),
          ("Search space", "configs/search/<name>.yaml", SearchSpace),
          ("Recipe", "ensembles/<name>.yaml (written by make ensemble)", Recipe)]


def _type(annotation) -> str:
    text = repr(annotation).replace("typing.", "").replace("competition.config.", "")
    text = re.sub(r"<class '([\w.]+)'>", r"\1", text)
    text = re.sub(r"ForwardRef\(\"?'?(\w+)'?\"?\)", r"\1", text)
    # Annotated[T, validators...] -> T (the validators are what the error messages explain)
    while "Annotated[" in text:
        start = text.index("Annotated[")
        depth, i = 0, start + len("Annotated[")
        inner_start, cut = i, None
        for i in range(inner_start, len(text)):
            ch = text[i]
            if ch in "[(":
                depth += 1
            elif ch in "])":
                if depth == 0:
                    break
                depth -= 1
            elif ch == "," and depth == 0 and cut is None:
                cut = i
        first = text[inner_start:cut if cut is not None else i]
        text = text[:start] + first + text[i + 1:]
    return text.replace("NoneType", "None").replace("|", "\\|")


def _nested(annotation) -> type[BaseModel] | None:
    for a in (annotation, *typing.get_args(annotation)):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return None


def _rows(model: type[BaseModel], prefix: str = ""):
    for name, f in model.model_fields.items():
        if f.exclude:
            continue
        key = f"{prefix}{name}"
        sub = _nested(f.annotation)
        default = "required" if f.is_required() else repr(f.get_default(call_default_factory=True))
        if sub is not None and not typing.get_args(f.annotation)[:1] == (list,):
            yield key, sub.__name__, default if len(default) < 60 else "…"
            yield from _rows(sub, key + ".")
        else:
            yield key, _type(f.annotation), default if len(default) < 80 else default[:77] + "..."


def render() -> str:
    out = ["# Configuration keys", "",
           "Generated from the typed configuration (`competition/config.py`) when the site is built. Unknown",
           "keys, and NaN or infinity in any number, are errors naming the file and the key.", ""]
    for title, where, model in MODELS:
        out += [f"## {title}", "", f"`{where}`", "", "| key | type | default |", "|---|---|---|"]
        out += [f"| `{k}` | {t} | `{d}` |".replace("`required`", "required") for k, t, d in _rows(model)]
        out.append("")
    return "\n".join(out)


def on_files(files, config):
    files.append(File.generated(config, "reference.md", content=render()))
    return files
