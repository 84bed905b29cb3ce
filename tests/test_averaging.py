"""Weight averaging: the mean of the k best epochs and SWA are validated like an epoch, recorded in
metrics.json, and become best.pt only when they score better."""
from __future__ import annotations

import pandas as pd
import pytest
import torch
from test_train import write_exp

from competition.cli import main
from competition.config import load_experiment
from competition.train.averaging import mean_state


def test_mean_state_is_the_elementwise_mean_and_keeps_counters():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(5)}
    m = mean_state([a, b])
    assert torch.equal(m["w"], torch.tensor([2.0, 4.0])) and int(m["n"]) == 3


@pytest.mark.slow
def test_top_k_and_swa_are_scored_and_differ_from_every_epoch(tiny_project):
    from competition.train.loop import fit
    assert main(["folds", "--comp", "tiny-hands"]) == 0
    write_exp(tiny_project, "avg", model={"arch": "Unet", "encoder": "tu-test_resnet"}, data={"input_size": 32},
              train={"epochs": 4, "average_top_k": 3, "swa": {"start_epoch": 3, "lr": 0.001}},
              tracking={"wandb": False})
    m = fit(load_experiment("avg"), 0, log=lambda *_: None)
    run = tiny_project / "runs/avg/fold0"
    assert set(m["averaging"]) == {"top3", "swa"} and all(0 <= v <= 1 for v in m["averaging"].values())
    tops = sorted((run / "top").glob("epoch*.pt"))
    assert len(tops) == 3
    avg = mean_state([torch.load(p, weights_only=True)["model"] for p in tops])
    singles = [torch.load(p, weights_only=True)["model"] for p in tops]
    key = next(k for k, v in avg.items() if v.is_floating_point() and v.numel() > 10)
    assert all(not torch.equal(avg[key], s[key]) for s in singles)  # the average is no single epoch
    best = torch.load(run / "best.pt", weights_only=True)
    chosen = best.get("averaged")
    epochs_best = pd.read_csv(run / "history.csv")["val_dice"].max()
    # best.pt holds whichever scored best: an average only if it beat every epoch.
    assert m["val_dice"] == pytest.approx(max(epochs_best, *m["averaging"].values()))
    assert m["best_is"] == (chosen or f"epoch {best['epoch']}")
    if chosen:
        assert m["averaging"][chosen] == pytest.approx(m["val_dice"])
