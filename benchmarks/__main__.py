"""``make bench`` / ``python -m benchmarks [NAME...]``: run ``benchmarks/bench_*.py`` (all, or those whose
name contains one of the NAMEs), one after the other in this process. ``python -m benchmarks pipeline``
times the whole default pipeline instead (``benchmarks/pipeline.py``), ``python -m benchmarks scale``
the ensemble at the hand-bone competition's size (``benchmarks/scale.py``).

Every comparison goes through :func:`benchmarks.harness.compare`: the sides alternate round by round,
min and median of each are printed with the ratio of the mins, the outputs are checked equal first,
thread counts and the load average are printed beside the figures. These machines are shared and
noisy: the ratios are the result, absolute times are context.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import platform
import sys
import time
from pathlib import Path

os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
PEERS = ("pytorch_toolbelt", "ttach", "zarr")  # the `bench` extra of pyproject.toml


def _versions() -> str:
    import cv2
    import numpy as np
    import torch

    return (f"python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}, "
            f"opencv {cv2.__version__}, {os.cpu_count()} cpus ({platform.processor() or platform.machine()})")


def main(argv: list[str]) -> int:
    from benchmarks.harness import load

    if argv[:1] == ["pipeline"]:  # minutes, not seconds: never part of a plain `make bench`
        from benchmarks import pipeline
        return pipeline.main(argv[1:])
    if argv[:1] == ["scale"]:  # the ensemble at hand-bone size: minutes too
        from benchmarks import scale
        return scale.main(argv[1:])

    names = sorted(p.stem for p in Path(__file__).parent.glob("bench_*.py"))
    wanted = [n for n in names if not argv or any(a in n for a in argv)]
    if not wanted:
        print(f"no benchmark matches {argv}; available: {', '.join(n[6:] for n in names)}", file=sys.stderr)
        return 2
    missing = [m for m in PEERS if importlib.util.find_spec(m) is None]
    if missing:
        print(f"the benchmark peers {', '.join(missing)} are not installed: `make venv` installs the `bench` extra "
              f"(or: pip install --no-deps pytorch-toolbelt ttach zarr numcodecs donfig google-crc32c)",
              file=sys.stderr)
        return 2
    start = time.perf_counter()
    print(f"benchmarks: {', '.join(wanted)}; {_versions()}; {load()}", flush=True)
    for name in wanted:
        t = time.perf_counter()
        print(f"\n== {name}  [{load()}]", flush=True)
        importlib.import_module(f"benchmarks.{name}").main()
        print(f"== {name} took {time.perf_counter() - t:.0f} s  [{load()}]", flush=True)
    print(f"\nall benchmarks took {time.perf_counter() - start:.0f} s  [{load()}]", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
