"""OOF = the submission, held out: a trained fold's held-out images predicted by the submission's own
member path (:class:`~competition.predict.infer.MemberPredictor`: the model rebuilt from ``best.pt``
and the resolved config inside it, the same preprocessing, sliding windows, TTA views and scales,
resize to the store size and uint8 quantisation), written to ``runs/<exp>/fold<k>/oof[-<variant>]/``.

Training's last step, ``competition oof`` (a trained fold without OOF, or a TTA variant) and nothing
else call :func:`predict_fold`; there is no second copy of inference to drift away from ``submit``.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader

from competition import oof, paths
from competition.predict.infer import MemberPredictor, TestInputs, batch_size_for
from competition.predict.members import load_model
from competition.predict.tta import variant_name
from competition.train.checkpoint import CheckpointError, file_hash


def predict_fold(exp_name: str, fold: int, comp, adapter, val_ids: list[str], views=("identity",),
                 scales=(1.0,), device: str | torch.device = "auto", log=print) -> Path:
    """Predict fold ``fold``'s held-out images with its ``best.pt`` and one TTA variant into its OOF store."""
    from competition.predict.run import pick_device
    dev = device if isinstance(device, torch.device) else pick_device(device)
    rp = paths.run(exp_name, fold)
    ckpt_path = rp.best
    if not ckpt_path.is_file():
        raise CheckpointError(f"{ckpt_path}: not found; train the fold first (make train EXP={exp_name} FOLD={fold})")
    in_ch = 1 if comp.image.channels == "grayscale" else 3
    model = load_model(ckpt_path, comp.classes, comp.task, dev, in_ch)
    exp = model.experiment
    size = oof.store_size(exp)
    member = MemberPredictor([model], comp.task, views, scales, size, dev)
    variant = variant_name(views, scales)
    ds = TestInputs(adapter, val_ids, {"in0": exp}, comp.task, split="train")
    loader = DataLoader(ds, batch_size=batch_size_for([exp]), shuffle=False, num_workers=exp.data.workers,
                        pin_memory=dev.type == "cuda")
    batches = ((b["index"].tolist(), member(b["inputs"]["in0"], b["size"]).cpu().numpy()) for b in loader)
    return oof.write(rp.oof(variant), val_ids, batches, comp.classes, size, {
        "experiment": exp_name, "fold": fold, "task": comp.task, "checkpoint": ckpt_path.name,
        "checkpoint_sha256": file_hash(ckpt_path), "tta": list(views), "tta_scales": [float(s) for s in scales],
        "variant": variant, "original_sizes": {i: list(adapter.image_size(i)) for i in val_ids}})
