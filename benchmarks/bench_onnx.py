"""ONNX Runtime against torch on the CPU, for the default recipe's networks (``--runtime onnx`` vs torch).

The case: ``configs/experiments/baseline.yaml``'s UNet 3+ (ResNet-10-T, depth 4) and ``unet3plus.yaml``'s
(depth 5), random init, one batch of ``data.batch_size`` (8) grayscale images at ``data.input_size`` (128²):
the network call of one inference batch, nothing around it (TTA, resizing and RLE are the same code for
both runtimes). Ours: torch, the module in fp32 as ``submit`` runs it on a CPU without native bf16
(``train.precision: bf16`` falls back to fp32 there). Peer: ONNX Runtime (CPUExecutionProvider) on the
network exported and checked by ``competition.predict.export.export_model``, with as many threads as
torch. Checked: same shape, logits equal within 1e-3 x max(1, max |logit|) (the export's own tolerance).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from benchmarks.harness import allclose, compare
from competition.config import load_experiment
from competition.models import build_model
from competition.predict.export import RTOL, export_model
from competition.predict.runtime import OnnxNet

CLASSES = 12


def main() -> None:
    for name in ("baseline", "unet3plus"):
        exp = load_experiment(name)
        size, batch = exp.data.input_hw, exp.data.batch_size
        torch.manual_seed(0)
        model = build_model(exp.model, CLASSES, 1, size).eval()
        x = torch.randn(batch, 1, *size, generator=torch.Generator().manual_seed(0))
        with tempfile.TemporaryDirectory() as t:
            record = export_model(model, "onnx", Path(t) / f"{name}.onnx", [size], 1)
            net = OnnxNet(Path(t) / f"{name}.onnx", torch.device("cpu"))

        def run_torch():
            with torch.no_grad():
                return model(x)

        with torch.no_grad():
            scale = float(model(x).abs().max())
        compare(f"{name}.yaml's network ({exp.model.arch}, {exp.model.encoder}, depth {exp.model.encoder_depth}): "
                f"batch {batch} x 1 x {size[0]}x{size[1]} -> {CLASSES} logits, fp32, CPU",
                run_torch, {"onnxruntime": lambda: net(x)}, ours_label="torch", rounds=7,
                check=allclose(RTOL * max(1.0, scale), why="float rounding of two engines"),
                note=f"export: {record['exporter']} exporter, opset {record['opset']}, {record['seconds']:.1f} s; "
                     f"ONNX Runtime {net.provider} with {torch.get_num_threads()} threads (torch's)")


if __name__ == "__main__":
    main()
