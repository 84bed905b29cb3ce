"""Saved test-set probabilities (nnU-Net's ``--save_probabilities``): ``competition submit --save-probs``
keeps each member's uint8 probabilities of every test image, at the recipe's store size, in the OOF
store's format under ``runs/<exp>/test[-<variant>]/``; ``competition submit --from-probs`` blends them
again — new weights, thresholds, post-processing — without loading or running a model.

A store is valid for a member when its checkpoints (by sha256), TTA views, scales and store size
are the member's; otherwise ``--from-probs`` refuses it, naming what differs.
"""
from __future__ import annotations

import numpy as np

from competition import oof, paths
from competition.config import ConfigError, Recipe
from competition.predict.tta import variant_name


def signature(member, size) -> dict:
    """What a member's saved probabilities depend on."""
    return {"experiment": member.experiment, "checkpoints": sorted(c.sha256 for c in member.checkpoints),
            "tta": list(member.tta), "tta_scales": [float(s) for s in member.tta_scales], "size": list(size)}


def store_dir(member):
    return paths.test_store(member.experiment, variant_name(member.tta, member.tta_scales))


class Saver:
    """``on_probs`` for run_recipe: one store per distinct member, published when ``close`` is called."""

    def __init__(self, recipe: Recipe, ids: list[str], size, classes: list[str], original_sizes: dict):
        self.writers, self.index = [], {i: k for k, i in enumerate(ids)}
        seen = {}
        self.slot = []
        for m in recipe.members:
            d = store_dir(m)
            if d not in seen:
                seen[d] = len(self.writers)
                self.writers.append(oof.StoreWriter(d, ids, classes, tuple(size), {
                    **signature(m, size), "split": "test", "original_sizes": original_sizes}))
            self.slot.append(seen[d])

    def __call__(self, image_id: str, member_probs: list[np.ndarray]) -> None:
        for w_index, u in zip(self.slot, member_probs):
            self.writers[w_index].add([self.index[image_id]], u[None])

    def close(self) -> list:
        return [w.close() for w in self.writers]

    def abort(self) -> None:
        for w in self.writers:
            w.abort()


def open_saved(recipe: Recipe, ids: list[str], size) -> list[np.ndarray]:
    """Per member: its saved (N, C, h, w) uint8 probabilities in ``ids`` order (memory-mapped)."""
    out = []
    for m in recipe.members:
        d = store_dir(m)
        if not (d / paths.OOF_PROBS).is_file():
            raise ConfigError(f"{d}: no saved test probabilities for member {m.experiment} "
                              f"(TTA {'+'.join(m.tta)}); write them with `competition submit --save-probs`")
        probs, sids, meta = oof.read(d)
        want = signature(m, size)
        got = {k: meta.get(k) for k in want}
        if got != want:
            diff = sorted(k for k in want if got[k] != want[k])
            raise ConfigError(f"{d}: saved for other {', '.join(diff)} than the recipe's member {m.experiment}; "
                              f"write them again with `competition submit --save-probs`")
        pos = {s: r for r, s in enumerate(sids)}
        missing = [i for i in ids if i not in pos]
        if missing:
            raise ConfigError(f"{d}: no saved probabilities for test image(s) {missing[:5]}; the test set changed")
        rows = np.array([pos[i] for i in ids])
        out.append(probs if np.array_equal(rows, np.arange(len(rows))) else probs[rows])
    return out
