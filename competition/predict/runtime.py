"""What calls the network inside the one inference path (:mod:`competition.predict.infer`): torch (the
module itself, or ``torch.compile`` of it with ``--compile``) or ONNX Runtime (``--runtime onnx``).

Everything around the network (preprocessing, TTA views and scales, sliding windows, resizing,
blending, thresholds, RLE) is the same code for every runtime: an ONNX network is wrapped in
:class:`OnnxNet`, a callable taking and returning torch tensors like the module it replaces.
"""
from __future__ import annotations

import importlib
import os
import shutil
import warnings

import torch

from competition.config import ConfigError
from competition.installs import MissingExtra

RUNTIMES = ("torch", "onnx")
EXTRA = "export"  # pyproject.toml's extra holding onnx, onnxruntime and onnxscript


def need(module: str, what: str):
    """``module`` imported, or a one-line :class:`MissingExtra` naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module.split(".")[0]:
            raise  # a broken install of the package itself, not a missing extra
        raise MissingExtra(f"{what} needs {module}, which is not installed: install the {EXTRA!r} extra "
                           f"(pip install 'competition[{EXTRA}]', or pip install -e '.[{EXTRA}]' in a clone; "
                           f"make venv installs every extra)") from None


def providers(device: torch.device) -> list[str]:
    """ONNX Runtime's execution providers for ``device``: CUDA first where the installed build has it."""
    ort = need("onnxruntime", "--runtime onnx")
    if device.type == "cuda":
        if "CUDAExecutionProvider" in ort.get_available_providers():
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        warnings.warn("--runtime onnx on cuda: this onnxruntime has no CUDAExecutionProvider (install "
                      "onnxruntime-gpu); running on the CPU")
    return ["CPUExecutionProvider"]


class OnnxNet:
    """An ONNX file run by ONNX Runtime, called like the torch module it was exported from: a (B, C, H, W)
    float tensor in, the logits as a float32 tensor on the input's device out.

    The session uses as many threads as torch does (``torch.get_num_threads()``), so ``--runtime``
    changes the engine, not the machine's share. Tensors cross as numpy arrays on the host; on a GPU
    ONNX Runtime copies them to the device itself.
    """

    def __init__(self, path, device: torch.device):
        ort = need("onnxruntime", "--runtime onnx")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3  # errors only: its warnings about unused initialisers are noise here
        self.path = str(path)
        self.session = ort.InferenceSession(self.path, opts, providers=providers(device))
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        out = self.session.run(None, {self.input: arr})[0]
        return torch.from_numpy(out).to(x.device)

    def eval(self) -> "OnnxNet":
        return self

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]


def cxx_compiler() -> str | None:
    """The C++ compiler inductor would use on the CPU (``CXX``, else g++/c++/clang++ on the PATH)."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def compile_networks(models: list, device: torch.device) -> int:
    """``torch.compile`` every distinct network of ``models`` (per member, its :class:`LoadedModel` list;
    a model two members share is compiled once) in place; returns how many were compiled.

    On a GPU this is what ``--compile`` is for. On the CPU inductor compiles C++ and needs a compiler:
    without one it is refused here, in one line, rather than failing deep inside the first batch."""
    if device.type == "cpu" and cxx_compiler() is None:
        raise ConfigError("--compile on the CPU needs a C++ compiler (g++, or set CXX) for torch.compile's "
                          "inductor backend, and none was found: install one or drop --compile")
    done: set[int] = set()
    for member in models:
        for m in member:
            if id(m) in done:
                continue
            if isinstance(m.model, OnnxNet):
                raise ConfigError("--compile applies to --runtime torch (ONNX Runtime optimises its graph itself)")
            m.model = torch.compile(m.model)
            done.add(id(m))
    return len(done)
