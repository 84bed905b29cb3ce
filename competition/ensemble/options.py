"""What ``competition ensemble``'s flags become: built once by the CLI, read by every stage after it."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SearchOptions:
    """How the weights are searched (``--method --per-class --steps --trials --no-nested --threshold``).

    ``steps`` bounds Caruana's greedy path, ``trials`` Optuna's study; ``nested`` also repeats every
    search on each fold's complement, for the honest estimate; ``threshold`` binarises the search view
    (multilabel; a multiclass task takes the argmax).
    """
    method: str = "caruana"
    per_class: bool = False
    steps: int = 50
    trials: int = 100
    nested: bool = True
    threshold: float = 0.5


@dataclass(frozen=True)
class EnsembleOptions:
    """Everything ``competition ensemble`` takes besides the recipe's name and its members.

    ``workers``: processes for the passes over the images (None: every core). ``csv`` / ``truth_csv``:
    the recipe's OOF and the training truth in the competition's format, to score with ``competition score``.
    ``full_data``: members whose experiment has a finished all-data run submit with that one model
    (weights, thresholds and post-processing still chosen on the folds' OOF).
    """
    search: SearchOptions = field(default_factory=SearchOptions)
    postprocess: bool = True
    force_blend: bool = False
    workers: int | None = None
    csv: str | None = None
    truth_csv: str | None = None
    full_data: bool = False
