"""``competition ensemble``: weighted soft voting chosen on out-of-fold predictions.

    options.py      what the verb's flags become (EnsembleOptions, SearchOptions)
    members.py      ``EXP`` / ``EXP:VARIANT`` specs -> the candidate members' OOF views and the truth
    search.py       Caruana's greedy selection with replacement; an Optuna alternative
    nested.py       the searches in-sample and under nested CV
    pipeline.py     the verb end to end: search, native-resolution pass, the candidate chosen, outputs
    recipe.py       ensembles/<name>.yaml and .md

Everything that reads, blends and scores the OOF lives in :mod:`competition.cv`. An experiment at test
time is the average of its fold models, so its OOF (each image predicted by the one fold model that did
not train on it) stands for it; every member must cover the folds file.
"""
from competition.ensemble.options import EnsembleOptions, SearchOptions
from competition.ensemble.pipeline import run

__all__ = ["EnsembleOptions", "SearchOptions", "run"]
