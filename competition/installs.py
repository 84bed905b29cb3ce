"""What each install holds: the optional extras (a missing one is a one-line error naming it), and the
runtime dependency closure of an installed distribution (an inference bundle's ``wheels/``, constraints.txt).

The core install (``pip install competition``) is what ``folds``, ``train``, ``submit`` and a bundle's
``run.py`` import. The extras add what only some commands import:

    tune   optuna       competition tune, ensemble --method optuna
    track  wandb        W&B tracking (without it, runs are recorded locally only)
    plots  matplotlib   runs --plot, lb's plot, tune --report's plots (scipy: lb's rank correlation)
    all    the three above; ``make venv`` installs all, dev, postgres, and bench and nnunet (no-deps)
"""
from __future__ import annotations

import importlib.metadata as md
import re
from pathlib import Path

from packaging.requirements import Requirement

from competition.errors import UserError
from competition.io import atomic_write_text

# top-level module -> the extra that installs it (pyproject.toml's [project.optional-dependencies])
EXTRAS = {"optuna": "tune", "wandb": "track", "matplotlib": "plots", "scipy": "plots"}


class MissingExtra(UserError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def missing_extra(exc: BaseException, command: str | None = None) -> MissingExtra | None:
    """The one-line error for ``exc`` when it is ModuleNotFoundError for a module an extra provides."""
    if not isinstance(exc, ModuleNotFoundError) or exc.name not in EXTRAS:
        return None  # a sub-module missing from an installed package is a broken install, not a missing extra
    extra = EXTRAS[exc.name]
    who = f"`competition {command}`" if command else "this command"
    return MissingExtra(f"{who} needs {exc.name}, which is not installed: install the {extra!r} extra "
                        f"(pip install 'competition[{extra}]', or pip install -e '.[{extra}]' in a clone; "
                        f"make venv installs every extra)")


def _name(s: str) -> str:
    return re.sub(r"[-_.]+", "-", s).lower()  # PEP 503 normalised


def closure(requirements: list[str], skip: frozenset[str] = frozenset(), env: dict | None = None) -> dict[str, str]:
    """Every installed distribution ``requirements`` need at run time, transitively: {name: version}.

    Markers are evaluated for this interpreter (``env`` overrides some of its values, e.g.
    ``{"python_version": "3.12"}``); extras of a requirement are followed. Distributions named in
    ``skip`` are neither listed nor descended into. A requirement that is not installed is an error:
    the list is meant to be what this environment runs with.
    """
    skip = {_name(s) for s in skip}
    found: dict[str, str] = {}
    todo = [(Requirement(r), "") for r in requirements]
    seen: set[tuple[str, str]] = set()
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({**(env or {}), "extra": extra}):
            continue
        name = _name(req.name)
        if name in skip:
            continue
        for ex in sorted(req.extras) or [""]:
            if (name, ex) in seen:
                continue
            seen.add((name, ex))
            try:
                dist = md.distribution(req.name)
            except md.PackageNotFoundError:
                raise UserError(f"{req.name} ({req}) is required but not installed here; run make venv") from None
            found[name] = dist.version
            todo += [(Requirement(r), ex) for r in dist.requires or []]
    return dict(sorted(found.items()))


def project_requirements(pyproject: str | Path, extras: tuple[str, ...] = ()) -> list[str]:
    """The core dependencies in ``pyproject``, plus those of ``extras`` (self-references followed)."""
    # tomllib is in the standard library from Python 3.11 only, and requires-python is >=3.10: at the top it
    # would break importing this module (hence `competition bundle` and a bundle's run.py) on 3.10
    import tomllib  # noqa: PLC0415 (stdlib from 3.11 only; the package supports 3.10)
    project = tomllib.loads(Path(pyproject).read_text())["project"]
    optional, me = project.get("optional-dependencies", {}), _name(project["name"])
    reqs, todo, done = list(project.get("dependencies", [])), list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in done:
            continue
        done.add(extra)
        for r in optional.get(extra, []):
            if _name(Requirement(r).name) == me:
                todo += sorted(Requirement(r).extras)
            else:
                reqs.append(r)
    return reqs


def write_constraints(path: str | Path = "constraints.txt", pyproject: str | Path = "pyproject.toml",
                      extras: tuple[str, ...] = ("all", "dev", "docs", "postgres"),
                      no_deps: tuple[str, ...] = ("bench", "nnunet")) -> int:
    """Pin everything ``make venv`` installs to the versions installed now (``make constraints``)."""
    pins = closure(project_requirements(pyproject, extras))
    core = set(project_requirements(pyproject))
    for r in project_requirements(pyproject, no_deps):  # extras installed --no-deps: the packages, not their deps
        if r not in core:
            pins[_name(Requirement(r).name)] = md.version(Requirement(r).name)
    body = "".join(f"{n}=={v}\n" for n, v in sorted(pins.items()))
    atomic_write_text(Path(path), HEADER + body)
    return len(pins)


HEADER = """\
# The versions the README's numbers come from: `make venv` installs with `pip install -c constraints.txt`.
# Generated by `make constraints` from the .venv (every package `make venv` installs, pinned); regenerate
# after an intended upgrade and commit it with the numbers it changes. Floors: constraints-min.txt.
"""
