"""The user's side of a run: one line per stage and per sequence on stderr, and SIGTERM ended like Ctrl-C.

The scheduler prints a stage's line as it commits the stage; a launcher's driver rebuilds the same line from
the committed files (stage.json, eval.json, train.json, summary.json).
"""

from __future__ import annotations

import signal
import sys

from harness import distributed as D


def say(msg: str, *, every_rank: bool = False) -> None:
    """One line for the user (stderr, so stdout stays machine-readable); under a launcher only rank 0's,
    unless every_rank (then prefixed with the rank)."""
    if every_rank and D.is_distributed():
        msg = f"[rank {D.rank()}/{D.world_size()}] {msg}"
    elif not D.is_main():
        return
    sys.stderr.write(msg + "\n")  # one write: ranks sharing a stream do not split each other's lines
    sys.stderr.flush()


def _signed(v) -> str:
    return "n/a" if v is None else f"{v:+.3f}"


def stage_line(label: str, n_stages: int, info: dict, ev: dict, tr: dict | None = None) -> str:
    """The one line a finished stage gets, from its stage.json, eval.json and train.json contents.

    The scheduler prints it as it commits a stage; a launcher's driver rebuilds it from the committed files."""
    scores = " ".join(f"{k}={v:.2f}" for k, v in ev.get("scores", {}).items())
    if info.get("stage") == 0:
        return f"[{label}] stage 0 (base model) {scores}  eval {ev.get('wall_s', 0):.1f}s"
    losses = (tr or {}).get("losses") or []
    loss = f"loss {losses[0]:.3f}->{losses[-1]:.3f} " if losses else ""
    other = f" other {info['overhead_s']:.1f}s ({100 * info['overhead_frac']:.1f}%)" if "overhead_s" in info else ""
    method_s = info.get("method_setup_s", 0.0) + info.get("method_teardown_s", 0.0)
    method = (
        f" method {method_s:.1f}s" if method_s >= 0.05 else ""
    )  # a baseline's own setup and teardown (Fisher, SVDs)
    return (
        f"[{label}] stage {info['stage']}/{n_stages} {info.get('task')}: {loss}{info.get('train_steps', 0)} steps "
        f"{info.get('train_tok_s', 0):.0f} tok/s | train {info.get('train_s', 0):.1f}s eval {info.get('eval_s', 0):.1f}s"
        f"{method}{other} | {scores}{not_learned_note(info.get('learn_check'))}"
    )


def not_learned_note(check: dict | None) -> str:
    """The console's flag for tasks a stage did not learn (empty when all were learned or none was judged)."""
    if not check or not check.get("not_learned"):
        return ""
    items = ", ".join(f"{f['task']} {f['score']:.2f} (base {f['base']:.2f})" for f in check["not_learned"])
    return f" | NOT LEARNED (own-stage score under base + {check['margin']:g}; a training failure, not forgetting): {items}"


def done_line(label: str, summary: dict) -> str:
    """The line a finished sequence gets, from its summary.json contents."""
    flagged = summary.get("not_learned") or []
    return (
        f"[{label}] done: ACC {_signed(summary.get('acc'))} BWT {_signed(summary.get('bwt'))} FWT {_signed(summary.get('fwt'))} "
        f"forgetting {_signed(summary.get('forgetting'))} LA {_signed(summary.get('la'))}  "
        f"trainable {summary.get('trainable_params_effective', 0):,}"
        + (f"  NOT LEARNED: {', '.join(flagged)}" if flagged else "")
    )


def install_signal_handlers() -> None:
    """SIGTERM ends like Ctrl-C: runs are marked KILLED (interrupted), finished stages stay for resume."""

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)
