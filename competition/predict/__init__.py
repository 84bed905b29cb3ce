"""Test-time inference and submissions.

    tta.py      paired augment / de-augment views and the batched TTA forward (pure)
    sliding.py  Gaussian-weighted sliding windows for images larger than the model input (pure)
    members.py  a recipe's checkpoints: hash-checked, rebuilt from their own configs, loaded once
    infer.py    one batch through every model: TTA, weights, resize to original size, threshold on device
    submit.py   expected rows, the streaming CSV writer with its RLE worker pool, validation
    options.py  how a prediction runs (device, batch size, workers, runtime, --force, ...): one value, CLI to
                run_recipe
    runtime.py  what calls the network: torch, torch.compile, or ONNX Runtime (OnnxNet)
    recipes.py  which recipe a command means (--ensemble NAME, a path, or the newest)
    run.py      `competition submit` / `competition predict`
    export.py   `competition export`: checked ONNX / TorchScript files + export.json; --runtime onnx's loader
    estimate.py a bundle's run time, measured on this machine through the real path
    bundle.py   `competition bundle`: an offline folder that reproduces the submission
"""
