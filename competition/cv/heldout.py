"""OOF = the submission, held out: a trained fold's held-out images predicted by the submission's own
member path (:class:`~competition.predict.infer.MemberPredictor`: the model rebuilt from ``best.pt``
and the resolved config inside it, the same preprocessing, sliding windows, TTA views and scales,
resize to each image's original size and uint8 quantisation), written image by image to the store
``runs/<exp>/fold<k>/oof[-<variant>]/`` (:mod:`competition.store.tiles`).

Training's last step, ``competition oof`` (a trained fold without OOF, or a TTA variant) and nothing
else call :func:`predict_fold`; there is no second copy of inference to drift away from ``submit``.
Before anything is predicted the store's size is estimated and checked against the free disk space.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader

from competition import paths
from competition.checkpoint import CheckpointError
from competition.cv.views import default_workers
from competition.io import file_hash
from competition.predict.infer import MemberPredictor, TestInputs, batch_size_for
from competition.predict.members import load_model
from competition.predict.run import pick_device
from competition.predict.tta import variant_name
from competition.store import tiles


def predict_fold(exp_name: str, fold: int, comp, adapter, val_ids: list[str],
                 tta: tuple = (("identity",), (1.0,)), device: str | torch.device = "auto") -> Path:
    """Predict fold ``fold``'s held-out images with its ``best.pt`` and one TTA variant ``tta`` =
    (views, scales) into its OOF store."""
    views, scales = tta
    dev = device if isinstance(device, torch.device) else pick_device(device)
    rp = paths.run(exp_name, fold)
    ckpt_path = rp.best
    if not ckpt_path.is_file():
        raise CheckpointError(f"{ckpt_path}: not found; train the fold first (make train EXP={exp_name} FOLD={fold})")
    variant = variant_name(views, scales)
    sizes = {i: tuple(adapter.image_size(i)) for i in val_ids}
    tiles.check_space(rp.oof(variant), tiles.estimate_sizes(list(sizes.values()), len(comp.classes)),
                      f"the OOF of {exp_name} fold {fold}", "competition oof")
    in_ch = comp.in_channels
    model = load_model(ckpt_path, comp.classes, comp.task, dev, in_ch)
    exp = model.experiment
    member = MemberPredictor([model], comp.task, views, scales, dev)
    ds = TestInputs(adapter, val_ids, {"in0": exp}, comp.task, split="train")
    loader = DataLoader(ds, batch_size=batch_size_for([exp]), shuffle=False, num_workers=exp.data.workers,
                        pin_memory=dev.type == "cuda")
    w = tiles.StoreWriter(rp.oof(variant), val_ids, comp.classes, sizes, {
        "experiment": exp_name, "fold": fold, "task": comp.task, "checkpoint": ckpt_path.name,
        "checkpoint_sha256": file_hash(ckpt_path), "tta": list(views), "tta_scales": [float(s) for s in scales],
        "variant": variant}, workers=default_workers())
    try:
        for b in loader:
            for r, u in zip(b["index"].tolist(), member(b["inputs"]["in0"], b["size"])):
                w.add(r, u.cpu().numpy())
        return w.close()
    finally:
        w.abort()
