"""Out-of-fold predictions: produced, stored, read and scored, at each image's original size.

    heldout.py      a trained fold's held-out images through the submission's inference -> its OOF store
    views.py        an experiment's OOF across folds, the truth store, the image-by-image process pool
    sparse.py       one image's members and truth by uncertain tiles: the passes' per-image work
    blend.py        how members' uint8 probabilities are blended (integer counts or float weights)
    compact.py      the weight search's view: only pixels whose blended prediction can change
    native.py       thresholds, post-processing and scores of blends, image by image
    thresholds.py   a level per class from the threshold curves
    postprocess.py  keep-largest / minimum-area per class, nnU-Net's acceptance rule
    oofscore.py     ``competition oof``: an experiment's OOF score, per-image table, missing OOF
    suspects.py     ``competition oof --suspects``: likely label errors, with overlays

``train`` (its last step), ``ensemble`` and ``pseudo`` read and write OOF through this package only;
the store format itself (``competition.store``) sits below, where ``predict`` and ``data`` read it too.
"""
