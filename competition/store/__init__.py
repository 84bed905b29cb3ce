"""Probability maps at rest: the uint8 store (``tiles``) and the one quantisation, resize, blend and
binarisation of probabilities (``probs``) that OOF, submissions, saved test probabilities and
pseudo-labels all share. Below ``predict`` and ``data``, which both read it."""
