"""Saved test-set probabilities (nnU-Net's ``--save_probabilities``): ``competition submit --save-probs``
keeps each member's uint8 probabilities of every test image, at its original size, in the store
format (:mod:`competition.store.tiles`) under ``runs/<exp>/test[-<variant>]/``; ``competition submit
--from-probs`` blends them again — new weights, thresholds, post-processing — without loading or
running a model.

A store is valid for a member when its checkpoints (by sha256), TTA views and scales are the member's;
otherwise ``--from-probs`` refuses it, naming what differs.
"""
from __future__ import annotations

import numpy as np

from competition import paths
from competition.config import ConfigError, Recipe
from competition.predict.tta import variant_name
from competition.store import tiles


def signature(member) -> dict:
    """What a member's saved probabilities depend on."""
    return {"experiment": member.experiment, "checkpoints": sorted(c.sha256 for c in member.checkpoints),
            "tta": list(member.tta), "tta_scales": [float(s) for s in member.tta_scales]}


def store_dir(member):
    return paths.test_store(member.experiment, variant_name(member.tta, member.tta_scales))


class Saver:
    """``on_probs`` for run_recipe: one store per distinct member, published when ``close`` is called."""

    def __init__(self, recipe: Recipe, ids: list[str], classes: list[str], original_sizes: dict):
        self.writers, self.index = [], {i: k for k, i in enumerate(ids)}
        seen = {}
        self.slot = []
        for m in recipe.members:
            d = store_dir(m)
            if d not in seen:
                tiles.check_space(d, tiles.estimate_sizes(list(original_sizes.values()), len(classes)),
                                  f"the saved test probabilities of {m.experiment}", "competition submit --save-probs")
                seen[d] = len(self.writers)
                self.writers.append(tiles.StoreWriter(d, ids, classes, original_sizes,
                                                      {**signature(m), "split": "test"}))
            self.slot.append(seen[d])

    def __call__(self, image_id: str, member_probs: list[np.ndarray]) -> None:
        done = set()
        for w_index, u in zip(self.slot, member_probs):
            if w_index not in done:
                self.writers[w_index].add(self.index[image_id], np.ascontiguousarray(u))
                done.add(w_index)

    def close(self) -> list:
        return [w.close() for w in self.writers]

    def abort(self) -> None:
        for w in self.writers:
            w.abort()


def open_saved(recipe: Recipe, ids: list[str]) -> list:
    """Per member: a function of a row of ``ids`` giving its saved (C, H, W) uint8 probabilities."""
    out = []
    for m in recipe.members:
        d = store_dir(m)
        if not tiles.exists(d):
            raise ConfigError(f"{d}: no saved test probabilities for member {m.experiment} "
                              f"(TTA {'+'.join(m.tta)}); write them with `competition submit --save-probs`")
        st = tiles.open_store(d)
        want = signature(m)
        got = {k: st.meta.get(k) for k in want}
        if got != want:
            diff = sorted(k for k in want if got[k] != want[k])
            raise ConfigError(f"{d}: saved for other {', '.join(diff)} than the recipe's member {m.experiment}; "
                              f"write them again with `competition submit --save-probs`")
        pos = {s: r for r, s in enumerate(st.ids)}
        missing = [i for i in ids if i not in pos]
        if missing:
            raise ConfigError(f"{d}: no saved probabilities for test image(s) {missing[:5]}; the test set changed")
        rows = [pos[i] for i in ids]
        out.append(lambda r, st=st, rows=rows: st.image(rows[r]))
    return out
