"""``make bench``: run every ``benchmarks/bench_*.py``. Each prints ratios against a peer measured
in the same run (these machines are noisy; absolute times are only context)."""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"


def main(argv: list[str]) -> int:
    names = sorted(p.stem for p in Path(__file__).parent.glob("bench_*.py"))
    wanted = [n for n in names if not argv or any(a in n for a in argv)]
    for name in wanted:
        print(f"== {name}", flush=True)
        importlib.import_module(f"benchmarks.{name}").main()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
