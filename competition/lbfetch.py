"""``competition lb --fetch``: leaderboard scores read from Kaggle into the ledger.

The ``kaggle`` package's API lists a competition's submissions with their public and private scores
(``KaggleApi.competition_submissions``; credentials as the ``kaggle`` CLI finds them). A Kaggle
submission is matched to a ledger row by its file name, the name ``competition lb --upload`` (and the
``kaggle`` CLI) submit under; when one file was submitted more than once, the newest scored one counts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from competition import ledger
from competition.config import ConfigError, load_competition

PAGE = 100  # submissions per request; a team makes at most a few per day


@dataclass
class Fetched:
    recorded: list[tuple[str, float | None, float | None]] = field(default_factory=list)  # file, public, private
    pending: list[str] = field(default_factory=list)  # matched, not scored yet (or failed on Kaggle)
    unmatched: list[str] = field(default_factory=list)  # on Kaggle, not in the ledger
    no_slug: list[str] = field(default_factory=list)  # ledger competitions without submission.kaggle

    def lines(self) -> list[str]:
        out = [f"{f}: public {_show(p)}, private {_show(q)}" for f, p, q in self.recorded]
        if self.pending:
            out.append(f"not scored on Kaggle yet: {', '.join(self.pending)}")
        if self.unmatched:
            out.append(f"on Kaggle but not in the ledger (submitted by hand or renamed): {', '.join(self.unmatched)}")
        if self.no_slug:
            out.append(f"skipped competition(s) {', '.join(self.no_slug)}: no submission.kaggle (the Kaggle slug) "
                       f"in the competition config")
        return out or ["nothing to fetch: the ledger has no submissions"]


def _show(v: float | None) -> str:
    return "-" if v is None else f"{v:.6f}"


def kaggle_api():
    """The ``kaggle`` package's API, authenticated; one clear line when it cannot be."""
    if not ledger.kaggle_configured():
        raise ConfigError("cannot fetch: no Kaggle credentials (KAGGLE_USERNAME/KAGGLE_KEY, or kaggle.json in "
                          "~/.kaggle or KAGGLE_CONFIG_DIR); see https://github.com/Kaggle/kaggle-api#api-credentials")
    try:
        # The package authenticates on import and reads the network on use: only for this verb.
        from kaggle.api.kaggle_api_extended import KaggleApi  # noqa: PLC0415 (optional: pip install kaggle)
    except ImportError:
        raise ConfigError("cannot fetch: the kaggle package is not installed (pip install kaggle)") from None
    api = KaggleApi()
    try:
        api.authenticate()
    except (Exception, SystemExit) as e:  # the package exits on bad credentials
        raise ConfigError(f"cannot fetch: Kaggle refused the credentials ({e})") from None
    return api


def _score(v) -> float | None:
    """Kaggle's score strings: "" or None while pending or when the score is hidden."""
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if 0 <= x <= 1 else None


def submissions(api, slug: str) -> list:
    """Every submission of the team in competition ``slug``, newest first, page by page."""
    out, page = [], 1
    while True:
        try:
            got = api.competition_submissions(slug, page_number=page, page_size=PAGE) or []
        except Exception as e:  # HTTP errors from the API: one line naming the competition
            raise ConfigError(f"cannot fetch the submissions of Kaggle competition {slug!r}: {e}") from None
        out += [s for s in got if s is not None]
        if len(got) < PAGE:
            return out
        page += 1


def fetch(api=None) -> Fetched:
    """Record the public/private scores of every ledger submission found on Kaggle."""
    df = ledger.read()
    result = Fetched()
    if df.empty:
        return result
    ours: dict[str, list[str]] = {}  # Kaggle slug -> our file names
    for comp_name in sorted(set(df["competition"])):
        slug = load_competition(comp_name).submission.kaggle
        if not slug:
            result.no_slug.append(comp_name)
            continue
        ours.setdefault(slug, []).extend(Path(f).name for f in df.loc[df["competition"] == comp_name, "file"])
    if ours:
        api = api or kaggle_api()
    for slug, names in ours.items():
        newest: dict[str, object] = {}  # file name -> its newest scored Kaggle submission
        seen = set()
        for s in sorted(submissions(api, slug), key=lambda s: str(getattr(s, "date", "") or ""), reverse=True):
            name = Path(str(getattr(s, "file_name", "") or "")).name
            seen.add(name)
            if name in names and name not in newest and _score(s.public_score) is not None:
                newest[name] = s
        for name in dict.fromkeys(names):
            s = newest.get(name)
            if s is None:
                if name in seen:
                    result.pending.append(name)
                continue
            public, private = _score(s.public_score), _score(getattr(s, "private_score", None))
            ledger.record(name, public, private)
            result.recorded.append((name, public, private))
        result.unmatched += sorted(seen - set(names) - {""})
    return result
