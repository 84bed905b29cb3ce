"""The submissions ledger: rows, leaderboard scores, the CV-vs-LB table and PNG, Kaggle upload."""
from __future__ import annotations

import os
import stat
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from competition import ledger
from competition.config import CompetitionConfig, Recipe, RecipeCheckpoint, RecipeMember

CLASSES = ["a", "b"]


def recipe(name: str, in_sample: float, nested: float | None = None, weights=(0.6, 0.4)) -> Recipe:
    ck = [RecipeCheckpoint(path="runs/x/fold0/best.pt", sha256="0" * 16)]
    members = [RecipeMember(experiment="base", folds=[0], checkpoints=ck, weights=[weights[0]],
                            tta=["identity", "hflip"], tta_scales=[1.0, 1.25]),
               RecipeMember(experiment="u3p", folds=[0], checkpoints=ck, weights=[weights[1]])]
    native = {"in_sample": in_sample, **({"nested": {"mean": nested, "std": 0.01}} if nested is not None else {})}
    scores = {**native, "at_oof_size": {"in_sample": in_sample + 0.01}}
    return Recipe(name=name, competition="c", task="multilabel", classes=CLASSES, folds_sha256="f",
                  members=members, thresholds=[0.5, 0.5], scores=scores)


def add(project: Path, name: str, in_sample: float, nested: float | None = None) -> str:
    path = project / "submissions" / f"2025-{name}.csv"
    result = SimpleNamespace(path=path, images=4, seconds=1.5)
    ledger.append(ledger.row_for(result, recipe(name, in_sample, nested), "abc123", "c"))
    return path.name


def test_rows_scores_and_table(project):
    first = add(project, "e1", 0.90, 0.88)
    add(project, "e2", 0.92)
    df = ledger.read()
    assert df.columns.tolist() == ledger.COLUMNS and len(df) == 2
    row = df.iloc[0]
    assert row["file"] == "submissions/2025-e1.csv" and row["ensemble"] == "e1" and row["ensemble_sha256"] == "abc123"
    assert row["members"] == "base(f0)x0.60 + u3p(f0)x0.40"
    assert row["tta"] == "base:identity+hflip@1,1.25 u3p:identity@1"
    assert float(row["cv_native_in_sample"]) == 0.9 and float(row["cv_native_nested"]) == 0.88
    assert float(row["oof_in_sample"]) == 0.91 and row["oof_nested"] == "" and row["public_lb"] == ""
    assert df.iloc[1]["cv_native_nested"] == ""

    ledger.record(first, public=0.8512)  # by file name
    ledger.record("submissions/2025-e1.csv", private=0.85)  # or by path; public is kept
    row = ledger.read().iloc[0]
    assert float(row["public_lb"]) == 0.8512 and float(row["private_lb"]) == 0.85
    t = ledger.cv_table(ledger.read())
    assert t.loc[0, "public_minus_cv"] == pytest.approx(0.8512 - 0.88)  # nested CV when known
    assert "0.8512" in ledger.format_table(ledger.read())
    with pytest.raises(ValueError,
                       match=r"nope.csv: not in .*ledger.csv; recent submissions: 2025-e1.csv, 2025-e2.csv"):
        ledger.record("nope.csv", public=0.5)
    with pytest.raises(ValueError, match="between 0 and 1"):
        ledger.record(first, public=97.3)


def test_per_class_weights_are_summarised():
    r = recipe("e", 0.9)
    r = r.model_copy(update={"members": [r.members[0].model_copy(update={"weights": [0.2, 0.8]}),
                                         r.members[1].model_copy(update={"weights": [0.8, 0.2]})]})
    assert ledger.describe_members(r) == "base(f0)x~0.50 + u3p(f0)x~0.50"


def test_scatter_png_and_correlation(project):
    for k, (cv, lb) in enumerate([(0.80, 0.78), (0.85, 0.83), (0.90, 0.86)]):
        name = add(project, f"e{k}", cv)
        ledger.record(name, public=lb)
    assert ledger.scatter(ledger.read()) == project / "submissions" / "cv_vs_lb.png"
    assert (project / "submissions/cv_vs_lb.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "rank correlation CV vs public LB (Spearman, 3 submissions): 1.00" in ledger.format_table(ledger.read())


def test_lb_command(project, capsys):
    from competition.cli import main
    name = add(project, "e1", 0.9)
    assert main(["lb"]) == 0
    assert "no leaderboard scores yet" in capsys.readouterr().out
    assert main(["lb", name, "--public", "0.91"]) == 0
    out = capsys.readouterr().out
    assert "0.9100" in out and "cv_vs_lb.png" in out
    assert main(["lb", "--public", "0.9"]) == 2
    assert "need the SUBMISSION" in capsys.readouterr().err


def test_a_ledger_with_missing_columns_is_an_error(project):
    (project / "submissions").mkdir()
    pd.DataFrame({"time": ["x"], "file": ["y"]}).to_csv(project / "submissions/ledger.csv", index=False)
    with pytest.raises(ValueError, match=r"ledger.csv: missing column\(s\) \['competition'"):
        ledger.read()


def kaggle_comp(slug="hand-bones") -> CompetitionConfig:
    return CompetitionConfig(name="c", data_root="d", format="rle_csv", classes=CLASSES,
                             submission={"kaggle": slug})


def test_upload_says_clearly_why_not(tmp_path, monkeypatch):
    sub = tmp_path / "s.csv"
    sub.write_text("x")
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(ValueError, match="has no submission.kaggle"):
        ledger.upload(sub, kaggle_comp(None), "m")
    with pytest.raises(ValueError, match=r"not uploaded: the Kaggle CLI is not installed \(pip install kaggle\)"):
        ledger.upload(sub, kaggle_comp(), "m")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.txt"
    fake = bin_dir / "kaggle"
    fake.write_text(f"#!/bin/sh\necho \"$@\" > {log}\necho 'Successfully submitted'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}/usr/bin:/bin")
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_CONFIG_DIR"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match="installed but not configured"):
        ledger.upload(sub, kaggle_comp(), "m")
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "kcfg"))
    (tmp_path / "kcfg").mkdir()
    (tmp_path / "kcfg/kaggle.json").write_text("{}")
    assert ledger.upload(sub, kaggle_comp(), "first try") == "Successfully submitted"
    assert log.read_text().split() == ["competitions", "submit", "-c", "hand-bones", "-f", str(sub),
                                       "-m", "first", "try"]


class FakeKaggle:
    """The two things `lb --fetch` uses of kaggle's KaggleApi: paged submissions with string scores."""

    def __init__(self, subs):
        self.subs, self.calls = subs, []

    def competition_submissions(self, slug, page_number=1, page_size=20):
        self.calls.append((slug, page_number))
        return self.subs[(page_number - 1) * page_size: page_number * page_size]


def kaggle_sub(file_name, public, private="", date="2026-01-01"):
    return SimpleNamespace(file_name=file_name, public_score=public, private_score=private, date=date)


def test_lb_fetch_records_kaggles_scores_by_file_name(project, monkeypatch):
    import yaml

    from competition import lbfetch
    from tests.conftest import tiny_competition
    comp = tiny_competition("c")
    comp["submission"] = {**comp.get("submission", {}), "kaggle": "hand-bones"}
    (project / "configs/competitions/c.yaml").write_text(yaml.safe_dump(comp))
    e1, e2, e3 = add(project, "e1", 0.9), add(project, "e2", 0.92), add(project, "e3", 0.93)
    monkeypatch.setattr(lbfetch, "PAGE", 2)  # three pages: paging is exercised
    api = FakeKaggle([kaggle_sub(e1, "0.9012", "0.8999", "2026-01-02"),
                      kaggle_sub(e1, "0.5", "0.5", "2026-01-01"),  # an older upload of the same file
                      kaggle_sub(e2, None), kaggle_sub("by-hand.csv", "0.7")])
    got = lbfetch.fetch(api)
    assert [c[1] for c in api.calls] == [1, 2, 3]
    assert got.recorded == [(e1, 0.9012, 0.8999)] and got.pending == [e2] and got.unmatched == ["by-hand.csv"]
    df = ledger.read()
    assert df.loc[ledger.find(df, e1), ["public_lb", "private_lb"]].tolist() == ["0.901200", "0.899900"]
    assert str(df.loc[ledger.find(df, e3), "public_lb"]) in ("", "nan")  # never submitted: untouched
    assert any("not scored on Kaggle yet" in line for line in got.lines())


def test_lb_fetch_without_credentials_or_slug_is_one_line(project, monkeypatch, tmp_path, capsys):
    from competition.cli import main
    for var in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_CONFIG_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    import yaml

    from tests.conftest import tiny_competition
    (project / "configs/competitions/c.yaml").write_text(yaml.safe_dump(tiny_competition("c")))
    add(project, "e1", 0.9)
    assert main(["lb", "--fetch"]) == 0  # no slug: nothing to ask Kaggle, and it says so
    assert "no submission.kaggle" in capsys.readouterr().out
    comp = tiny_competition("c")
    comp["submission"] = {**comp.get("submission", {}), "kaggle": "hand-bones"}
    (project / "configs/competitions/c.yaml").write_text(yaml.safe_dump(comp))
    assert main(["lb", "--fetch"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot fetch: no Kaggle credentials" in err[0]
