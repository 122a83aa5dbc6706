"""General-ability forgetting in the report: cross-entropy on the fixed general text, per stage and method.

Each finished sequence's summary.json holds general_ce (one value per stage, stage 0 = the base model),
general_ce_base and general_ce_rise (after the last stage − base; harness/general_text.py). Runs written
before it existed have none and are left out of these numbers (the page says when no run has them).
"""

from __future__ import annotations

import numpy as np

from harness.report.aggregate import mean_std_n
from harness.report.figures import _new_figure, _png_bytes
from harness.report.naming import display_name
from harness.report.numbers import finite, fmt, fmt_pm
from harness.report.store import SequenceRun

HEADERS = ["method", "runs", "base model CE", "CE after the last stage", "rise (↓)"]


def _curve(run: SequenceRun) -> list[float]:
    vals = (run.summary or {}).get("general_ce") or []
    return [float(v) if finite(v) else float("nan") for v in vals]


def curves(by_method: dict[str, list[SequenceRun]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """method -> (mean, std) of the cross-entropy per stage over its runs that logged it (reference runs left out)."""
    out = {}
    for method, runs in by_method.items():
        cs = [_curve(r) for r in runs if not r.reference and _curve(r)]
        if not cs:
            continue
        n = max(len(c) for c in cs)
        stack = np.full((len(cs), n), np.nan)
        for k, c in enumerate(cs):
            stack[k, :len(c)] = c
        with np.errstate(invalid="ignore"):
            mean = np.nanmean(stack, axis=0)
            std = np.nanstd(stack, axis=0, ddof=1) if len(cs) > 1 else np.full(n, np.nan)
        out[method] = (mean, std)
    return out


def rows(by_method: dict[str, list[SequenceRun]]) -> list[list[str]]:
    """The page's table: per method, mean ± std over runs of the base CE, the final CE and their difference."""
    out = []
    for method, runs in by_method.items():
        got = [r.summary for r in runs if r.summary and r.summary.get("general_ce_rise") is not None]
        if not got:
            continue
        base = mean_std_n([s.get("general_ce_base") for s in got])
        final = mean_std_n([s["general_ce_base"] + s["general_ce_rise"] for s in got])
        rise = mean_std_n([s["general_ce_rise"] for s in got])
        out.append([display_name(method), str(len(got)), fmt(base["mean"]), fmt_pm(final["mean"], final["std"]),
                    fmt_pm(rise["mean"], rise["std"])])
    return out


def figure(cs: dict[str, tuple[np.ndarray, np.ndarray]], colors) -> bytes | None:
    """general_ce.png: one line per method over stages (0 = base model), error bars = std over seeds."""
    if not cs:
        return None
    fig = _new_figure(6.5, 3.6)
    ax = fig.subplots()
    for method, (mean, std) in cs.items():
        x = np.arange(len(mean))
        ax.errorbar(x, mean, yerr=np.where(np.isfinite(std), std, 0.0), marker="o", capsize=3, label=display_name(method),
                    color=colors.get(method))
    ax.set_xlabel("stage (0 = base model)")
    ax.set_ylabel("cross-entropy on the general text (nats/token)")
    ax.set_title("General-ability forgetting: higher = more of the base model's general ability lost", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png_bytes(fig)
