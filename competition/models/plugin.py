"""Plug-in architectures: ``model.arch`` as an import path ``package.module:factory`` or the name of an
entry point in the group ``competition.architectures``; no edit of this package needed.

The factory is called as ``factory(in_channels=..., classes=..., **model.kwargs)`` and returns a
``torch.nn.Module``. An import path's module is imported normally (an installed package, or one on
``PYTHONPATH``); only if that fails is the project folder (the working directory,
``competition.paths.project()``) put first on ``sys.path``, for that import alone, so ``mynets/tiny.py``
beside ``configs/`` works as ``mynets.tiny:build`` without installing anything.

Output contract (checked by :class:`PluginModel`, which wraps every plug-in):

- eval mode: logits ``(N, classes, H, W)`` at the input size;
- training mode with ``model.deep_supervision: true``: a list/tuple of logits, the final one first (at
  the input size), then auxiliary ones at their own strides, finest first; or a dict
  ``{"out": logits, "aux": [logits, ...]}``, turned into ``[out, *aux]`` here. A single tensor is then
  an error naming ``model.deep_supervision``;
- without deep supervision, a list/tuple or dict is reduced to its final output (``out``), so a
  factory may always return its auxiliary outputs and the config decides whether they are trained.

The wrapper holds the factory's module as ``net``: checkpoint keys read ``net.<the module's keys>``,
and a checkpoint rebuilds through the same import path (``competition predict``, the bundle).
"""
from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.metadata as md
import inspect
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from competition import paths
from competition.config import ConfigError

GROUP = "competition.architectures"
_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


@dataclass(frozen=True)
class Plugin:
    """A resolved plug-in: ``factory``, how it was named (``import path`` or ``entry point``), and the
    import path it came from (``module:attr``)."""

    arch: str
    factory: Callable
    kind: str
    target: str


def import_path(arch: str) -> tuple[str, str] | None:
    """``("package.module", "factory")`` for ``package.module:factory``; None when ``arch`` has no ``:``."""
    if ":" not in arch:
        return None
    module, _, attr = arch.partition(":")
    if not _DOTTED.fullmatch(module) or not _DOTTED.fullmatch(attr):
        raise ConfigError(f"model.arch {arch!r}: an import path is package.module:factory (dotted Python names "
                          f"on both sides of one ':'), e.g. mynets.tiny:build")
    return module, attr


def entry_points() -> dict[str, md.EntryPoint]:
    """The installed entry points of the group ``competition.architectures``, by lower-case name."""
    return {ep.name.lower(): ep for ep in md.entry_points(group=GROUP)}


def _missing_itself(e: ModuleNotFoundError, module: str) -> bool:
    """Is it ``module`` (or a parent package of it) that is missing, not something it imports?"""
    parts = module.split(".")
    return e.name in {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


def import_module(module: str, arch: str):
    """``module`` imported normally, else with the project folder first on ``sys.path`` for this import
    only; a ConfigError naming ``model.arch`` when neither works."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if not _missing_itself(e, module):
            raise ConfigError(f"model.arch {arch!r}: importing {module} failed: {e} (a module it imports is not "
                              f"installed)") from None
    except Exception as e:  # noqa: BLE001 - the user's module failed while importing: say so in one line
        raise ConfigError(f"model.arch {arch!r}: importing {module} failed: {type(e).__name__}: {e}") from None
    root = str(paths.project().resolve())
    sys.path.insert(0, root)
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if _missing_itself(e, module):
            raise ConfigError(f"model.arch {arch!r}: no module named {module!r}, neither importable (installed, or "
                              f"on PYTHONPATH) nor under the project folder {root}; expected package.module:factory "
                              f"naming a module such as {root}/{module.replace('.', '/')}.py") from None
        raise ConfigError(f"model.arch {arch!r}: importing {module} failed: {e} (a module it imports is not "
                          f"installed)") from None
    except Exception as e:  # noqa: BLE001 - as above
        raise ConfigError(f"model.arch {arch!r}: importing {module} failed: {type(e).__name__}: {e}") from None
    finally:
        with contextlib.suppress(ValueError):  # the module may have edited sys.path itself
            sys.path.remove(root)


def _attribute(obj: Any, attr: str, arch: str, module: str) -> Callable:
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n))]
            close = difflib.get_close_matches(part, names, n=5)
            raise ConfigError(f"model.arch {arch!r}: {module} has no attribute {attr!r}"
                              f"{f'; close: {close}' if close else ''}; expected a factory "
                              f"(in_channels, classes, **model.kwargs) -> torch.nn.Module")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"model.arch {arch!r}: {module}.{attr} is a {type(obj).__name__}, not a factory "
                          f"(in_channels, classes, **model.kwargs) -> torch.nn.Module")
    return obj


def resolve(arch: str, builtin: list[str]) -> Plugin:
    """The plug-in ``arch`` names (an import path or an entry point); a ConfigError listing every valid
    name (``builtin`` + entry points) when it is neither."""
    parsed = import_path(arch)
    if parsed is not None:
        module, attr = parsed
        return Plugin(arch, _attribute(import_module(module, arch), attr, arch, module), "import path", arch)
    eps = entry_points()
    ep = eps.get(arch.lower())
    if ep is None:
        valid = sorted(set(builtin) | {e.name for e in eps.values()}, key=str.lower)
        raise ConfigError(f"model.arch: unknown architecture {arch!r}; valid: {', '.join(valid)}; or a plug-in "
                          f"as package.module:factory (see docs/extending.md)")
    try:
        factory = ep.load()
    except Exception as e:  # noqa: BLE001 - an installed plug-in that cannot load: one line naming it
        raise ConfigError(f"model.arch {arch!r}: the entry point {ep.name} = {ep.value} ({GROUP}) cannot be "
                          f"loaded: {type(e).__name__}: {e}") from None
    if not callable(factory):
        raise ConfigError(f"model.arch {arch!r}: the entry point {ep.value} is not callable")
    return Plugin(arch, factory, "entry point", ep.value)


def _params(factory: Callable) -> str:
    try:
        return str(inspect.signature(factory))
    except (TypeError, ValueError):
        return "(in_channels, classes, ...)"


def build(plugin: Plugin, in_channels: int, classes: int, kwargs: dict, deep_supervision: bool) -> "PluginModel":
    """``factory(in_channels=, classes=, **kwargs)`` wrapped in :class:`PluginModel`."""
    try:
        inspect.signature(plugin.factory).bind(in_channels=in_channels, classes=classes, **kwargs)
    except TypeError as e:
        raise ConfigError(f"model.kwargs for {plugin.arch}: {e}; the factory takes {_params(plugin.factory)} "
                          f"(in_channels and classes come from the competition)") from None
    except ValueError:
        pass  # no signature to check against (a builtin): the call below says it
    try:
        net = plugin.factory(in_channels=in_channels, classes=classes, **kwargs)
    except TypeError as e:
        raise ConfigError(f"model.kwargs for {plugin.arch}: the factory raised TypeError: {e}; it takes "
                          f"{_params(plugin.factory)}") from None
    if not isinstance(net, nn.Module):
        raise ConfigError(f"model.arch {plugin.arch!r}: the factory returned a {type(net).__name__}; expected a "
                          f"torch.nn.Module")
    return PluginModel(net, plugin.arch, classes, deep_supervision)


class PluginModel(nn.Module):
    """A plug-in's module under the forward contract of the module docstring."""

    def __init__(self, net: nn.Module, arch: str, classes: int, deep_supervision: bool):
        super().__init__()
        self.net, self.arch, self.classes, self.deep_supervision = net, arch, classes, deep_supervision

    def summary(self) -> str:
        return f"plug-in {self.arch} ({type(self.net).__module__}.{type(self.net).__name__})"

    def _error(self, what: str) -> ConfigError:
        return ConfigError(f"model.arch {self.arch!r}: the model {what}; the contract (docs/extending.md): logits "
                           f"(N, {self.classes}, H, W) at the input size in eval mode, and with "
                           f"model.deep_supervision a list (final first) or {{'out': ..., 'aux': [...]}} in training")

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        out = self.net(x)
        if isinstance(out, dict):
            if "out" not in out:
                raise self._error(f"returned a dict with keys {sorted(out)}, not 'out' (and 'aux')")
            aux = out.get("aux") or []
            out = [out["out"], *(aux if isinstance(aux, (list, tuple)) else [aux])]
        if isinstance(out, (list, tuple)):
            outs = list(out)
        elif isinstance(out, torch.Tensor):
            outs = [out]
        else:
            raise self._error(f"returned a {type(out).__name__}")
        if not outs or not all(isinstance(o, torch.Tensor) and o.dim() == 4 for o in outs):
            raise self._error("returned something other than 4-d logits tensors")
        final = outs[0]
        if final.shape[1] != self.classes or final.shape[-2:] != x.shape[-2:]:
            raise self._error(f"returned logits {tuple(final.shape)} for an input {tuple(x.shape)}")
        if not (self.training and self.deep_supervision):
            return final
        if len(outs) < 2:
            raise ConfigError(f"model.deep_supervision is true, but {self.arch} returned a single output in "
                              f"training mode; return [final, *auxiliary] or {{'out': ..., 'aux': [...]}}, or set "
                              f"model.deep_supervision: false")
        return outs


def source_files(arch: str) -> tuple[str, Path] | None:
    """What an offline bundle must carry for an import-path plug-in: (the name to copy it as, the file or
    package folder). The top-level package folder when the module lives inside the project folder, the
    module's own .py file when it is a top-level module elsewhere; None for a built-in or entry-point
    architecture. A ConfigError when it cannot be carried (a module of a package outside the project)."""
    parsed = import_path(arch)
    if parsed is None:
        return None
    module, _ = parsed
    top = module.split(".")[0]
    if top == "competition":
        return None  # this package: the bundle installs it anyway
    mod = import_module(module, arch)
    file = Path(mod.__file__).resolve() if getattr(mod, "__file__", None) else None
    project = paths.project().resolve()
    top_mod = sys.modules[top]
    if hasattr(top_mod, "__path__"):  # a package, regular or namespace (a folder without __init__.py)
        inside = [p for p in map(Path, top_mod.__path__) if p.resolve().is_relative_to(project)]
        if inside:
            return top, inside[0].resolve()
    elif file is not None and file.suffix == ".py":  # a top-level module: its one file
        return f"{module}.py", file
    raise ConfigError(f"model.arch {arch!r}: {module} is imported from {file}, part of a package outside the "
                      f"project folder {project}; a bundle carries a plug-in's package only from inside the project "
                      f"folder (or a single top-level module file): move the package into the project folder and "
                      f"bundle again")
