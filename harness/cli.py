"""`harness` command line: the flags (those of `run`, `validate`, `merge`, `bench` generated from ExperimentConfig).

What each subcommand does is in harness/commands.py, imported only once the flags parsed: it pulls in PEFT,
lm-eval, MLflow and the report (measured on this 2-core machine, idle: `import harness.commands` 6.4 s,
`import harness.cli` with the config it needs for its flags 2.2 s), which `--help`, `harness methods` and a mistyped flag do not need."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from harness.config_loading import cli_fields
from harness.errors import HarnessError, interrupted_message
from harness.io import disk_full_error
from harness.legacy_keys import old_flags
from harness.models import downloads_allowed
from harness.tracking.auth import load_client_credentials


def _add_config_flags(p: argparse.ArgumentParser, skip: set[str] = frozenset()) -> None:
    g = p.add_argument_group("experiment knobs (override the YAML config; lists are comma-separated)")
    for name, field in cli_fields():
        if name in skip:
            continue
        default = field.default
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        flag = name.replace(".", "-").replace("_", "-")
        g.add_argument(
            f"--{flag}",
            *old_flags(name),
            dest=name,
            default=argparse.SUPPRESS,
            metavar=flag.upper(),
            help=f"{field.description} [default: {shown}]".replace("%", "%%"),
        )


def _training_commands(sub) -> None:
    """run, resume, merge (they train), validate, methods, suites."""

    def training_command(name: str, help_: str, func, positional: tuple[str, str, str | None]) -> None:
        c = sub.add_parser(name, help=help_)
        c.add_argument(positional[0], nargs=positional[2], metavar=positional[0].upper(), help=positional[1])
        c.add_argument("--no-report", action="store_true", help="Do not write the report at the end.")
        c.add_argument("--no-progress", action="store_true", help="No progress bars.")
        _add_config_flags(c)
        c.set_defaults(func=func)

    config_arg = ("config", "Experiment YAML (optional; flags override it).", "?")
    training_command(
        "run",
        "Run an experiment (every method x seed x task order); finished stages are skipped.",
        "cmd_run",
        config_arg,
    )
    training_command(
        "resume",
        "Continue an interrupted run from its folder (sequence or experiment folder).",
        "cmd_resume",
        ("run_dir", "A sequence folder or an experiment folder.", None),
    )
    training_command(
        "merge",
        "Train one adapter per task, evaluate each alone, merge them (PEFT), evaluate the merges.",
        "cmd_merge",
        config_arg,
    )

    v = sub.add_parser(
        "validate",
        help="Check a config (suite, model, capacity, paths, tracking) without training; with only --suite, check that suite.",
    )
    v.add_argument("config", nargs="?", help="Experiment YAML (optional).")
    _add_config_flags(v)
    v.set_defaults(func="cmd_validate")

    m = sub.add_parser("methods", help="List the continual-learning methods: description, source, knobs.")
    m.set_defaults(func="cmd_methods")

    s = sub.add_parser("suites", help="List the task suites.")
    s.add_argument("--json", action="store_true", help="Machine-readable output.")
    s.set_defaults(func="cmd_suites")


def _report_commands(sub) -> None:
    """report, plan-seeds: read an experiment's run folders."""
    rep = sub.add_parser("report", help="Write the forgetting report (HTML + PNG + CSV/JSON) from the run folders.")
    rep.add_argument(
        "experiment", nargs="?", help="Experiment name (default: the only experiment folder under --results-dir)."
    )
    rep.add_argument("--results-dir", default="results", help="Results folder [default: results].")
    rep.add_argument(
        "--tracking-uri", default=None, help="MLflow tracking URI [default: MLFLOW_TRACKING_URI or the sqlite store]."
    )
    rep.add_argument(
        "--baseline",
        default=None,
        metavar="METHOD",
        help="Also compare METHOD with every other method (paired t over seeds per metric), not only the best "
        "method with the others [default: none].",
    )
    rep.set_defaults(func="cmd_report")

    ps = sub.add_parser(
        "plan-seeds",
        help="How many seeds a pair of methods needs: the test over the seeds that exist, "
        "the smallest difference they detect, the seeds the observed difference needs.",
    )
    ps.add_argument("experiment", metavar="EXPERIMENT", help="Experiment name (a folder under --results-dir).")
    ps.add_argument(
        "--methods",
        dest="plan_methods",
        required=True,
        metavar="A,B",
        help="The two methods to compare, comma-separated (differences are A − B).",
    )
    ps.add_argument("--results-dir", default="results", help="Results folder [default: results].")
    ps.add_argument(
        "--tracking-uri", default=None, help="MLflow tracking URI [default: MLFLOW_TRACKING_URI or the sqlite store]."
    )
    ps.add_argument("--json", dest="plan_json", metavar="FILE", help="Also write the plan as JSON.")
    ps.set_defaults(func="cmd_plan_seeds")


def _evidence_commands(sub) -> None:
    """evidence, tuning, tables: the committed evidence and the README's tables built from it."""
    ev = sub.add_parser(
        "evidence",
        help="Copy finished sequences' (or merge runs') compact evidence (summary, matrix or merged scores, "
        "documents, config) into results/evidence/TABLE/, the source of the published tables.",
    )
    ev.add_argument("run_folder", metavar="RUN_FOLDER", help="A sequence or merge folder, or a folder above them.")
    ev.add_argument(
        "--table", required=True, help="Evidence table name, e.g. headline-default (a folder under results/evidence/)."
    )
    ev.set_defaults(func="cmd_evidence")
    tu = sub.add_parser(
        "tuning",
        help="Choose each baseline's strength from a tuning grid on the validation split "
        "(make tune-baselines) and write its evidence to results/evidence/tuning-SUITE/, joined with what is there.",
    )
    tu.add_argument("run_folder", metavar="RUN_FOLDER", nargs="?", help="Default: results/tune-SUITE/tune-SUITE.")
    tu.add_argument("--pending", metavar="M:KNOB=V1,V2,...", help="Print this grid's values without evidence yet.")
    tu.add_argument(
        "--suite", required=True, help="The suite the grid ran on (names the evidence folder tuning-SUITE)."
    )
    tu.add_argument("--markdown", action="store_true", help="Print the choice as a Markdown table (docs/baselines.md).")
    tu.set_defaults(func="cmd_tuning")
    tb = sub.add_parser(
        "tables",
        help="Rewrite the README's and docs/merging.md's result tables from results/evidence/ "
        "(run from the repository root).",
    )
    tb.add_argument(
        "--check", action="store_true", help="Change nothing; exit 1 and name the tables that differ from the evidence."
    )
    tb.set_defaults(func="cmd_tables")


def _server_commands(sub) -> None:
    """dashboard, tracking-server: MLflow servers."""
    d = sub.add_parser("dashboard", help="Serve the MLflow UI over the results store on 127.0.0.1.")
    d.add_argument("--results-dir", default="results", help="Results folder [default: results].")
    d.add_argument("--port", type=int, default=5000, help="Port [default: 5000].")
    d.add_argument(
        "--tracking-uri", default=None, help="Store to serve [default: the sqlite store under --results-dir]."
    )
    d.set_defaults(func="cmd_dashboard")
    ts = sub.add_parser(
        "tracking-server",
        help="Run a shared MLflow tracking server on PostgreSQL until Ctrl-C (--host and --auth for several machines).",
    )
    ts.add_argument(
        "--results-dir",
        default="results",
        help="Results folder: PostgreSQL data and artifacts live under it [default: results].",
    )
    ts.add_argument("--port", type=int, default=5001, help="Port of the MLflow server [default: 5001].")
    ts.add_argument(
        "--host",
        default="127.0.0.1",
        help="Address to bind, e.g. 0.0.0.0 for the jobs of several machines "
        "(anything but loopback needs --auth) [default: 127.0.0.1].",
    )
    ts.add_argument(
        "--auth",
        action="store_true",
        help="MLflow's basic-auth: an admin password generated once and a `runs` user "
        "for the jobs, kept (mode 600) under <results-dir>/auth.",
    )
    ts.add_argument(
        "--backend-uri",
        default=None,
        help="Use this existing PostgreSQL URI (postgresql+psycopg://...) instead of starting one [default: start Debian's PostgreSQL].",
    )
    ts.set_defaults(func="cmd_tracking_server")


def _sequence_folder_commands(sub) -> None:
    """export, sync, verify: one sequence folder, or every one under a folder."""
    e = sub.add_parser(
        "export",
        help="Write a sequence's adapter at a committed stage as a stock PEFT folder "
        "(adapter_config.json + adapter_model.safetensors).",
    )
    e.add_argument(
        "run_dir", metavar="RUN_DIR", help="A sequence folder: results/<experiment>/<method>/seed-<s>[/order-<k>]."
    )
    e.add_argument("out", metavar="OUT", help="Folder to write: new or empty (never overwritten).")
    e.add_argument(
        "--stage",
        type=int,
        default=None,
        metavar="T",
        help="Committed stage to export [default: the last committed one].",
    )
    e.add_argument(
        "--register",
        default=None,
        metavar="NAME",
        help="Also register the stage's adapter (its MLflow model) as a "
        "new version of registered model NAME, linked to the sequence's parent run.",
    )
    e.add_argument(
        "--tracking-uri", default=None, help="With --register: the store [default: the one in the folder's state.json]."
    )
    e.set_defaults(func="cmd_export")

    sy = sub.add_parser(
        "sync", help="Mirror run folders into MLflow now (what an outage of the tracking server kept from it)."
    )
    sy.add_argument(
        "run_dir", metavar="RUN_DIR", help="A sequence folder, or a folder above sequence folders (an experiment)."
    )
    sy.add_argument("--tracking-uri", default=None, help="Store to mirror into [default: the one in each state.json].")
    sy.set_defaults(func="cmd_sync")

    ver = sub.add_parser(
        "verify",
        help="Check a run folder: file hashes, LoRI-S mask invariants, metrics recomputed from the "
        "matrix, MLflow against the folder. Exit 0 when all hold, 1 otherwise.",
    )
    ver.add_argument(
        "run_dir", metavar="RUN_DIR", help="A sequence folder, or a folder above sequence folders (an experiment)."
    )
    ver.add_argument(
        "--tracking-uri", default=None, help="MLflow store to compare with [default: the one in each state.json]."
    )
    ver.set_defaults(func="cmd_verify")


def _bench_command(sub) -> None:
    b = sub.add_parser(
        "bench", help="Median step time and tokens/s of each method's real training step, and a bare base-model step."
    )
    b.add_argument(
        "--methods",
        dest="bench_methods",
        default="base,peft-bare,lora,lori-d,lori-s",
        help="Comma-separated: base (bare base step), peft-bare (a bare PEFT LoRA loop, no harness code) and any "
        "method; with --compile MODE each method is also timed compiled [default: base,peft-bare,lora,lori-d,lori-s].",
    )
    b.add_argument(
        "--profile",
        action="store_true",
        help="Also profile each row (torch.profiler): aten ops, kernels, host vs device time, synchronisations per step.",
    )
    b.add_argument("--batch-size", dest="bench_batch_size", type=int, default=8, help="Batch size [default: 8].")
    b.add_argument("--seq-len", type=int, default=128, help="Tokens per sequence [default: 128].")
    b.add_argument("--steps", type=int, default=10, help="Timed steps per method after 2 warm-up steps [default: 10].")
    b.add_argument(
        "--memory",
        action="store_true",
        help="Also measure adapter training memory per method (params, grads, optimizer state, snapshots) from the tensors.",
    )
    b.add_argument(
        "--eval-suite",
        metavar="SUITE",
        help="Instead: time lm-eval on this suite's tasks through PEFT, with the adapters folded (eval_merged) and under "
        "bf16 autocast, and how far their answers agree.",
    )
    b.add_argument(
        "--eval-modes",
        default="peft_fp32,merged_fp32,merged_bf16",
        help="With --eval-suite: modes to time, of peft_fp32, merged_fp32, merged_bf16, peft_bf16 "
        "[default: peft_fp32,merged_fp32,merged_bf16].",
    )
    b.add_argument(
        "--eval-repeats",
        type=int,
        default=1,
        help="With --eval-suite: interleaved runs per mode; seconds = median [default: 1].",
    )
    b.add_argument(
        "--adapter",
        metavar="FOLDER",
        help="With --eval-suite: a PEFT adapter folder (e.g. from harness export) instead of a seeded adapter.",
    )
    b.add_argument(
        "--eval-bare",
        action="store_true",
        help="With --eval-suite: instead, time lm-eval against a bare batched scorer on the same requests.",
    )
    b.add_argument(
        "--stage-hooks",
        metavar="SUITE",
        help="Instead: time each method's stage setup and teardown (begin_stage / end_stage: InfLoRA's subspace, "
        "EWC's Fisher, a mask) on this suite's first two tasks, --steps training steps per stage, and their "
        "share of a stage's training time at the suite's budget.",
    )
    b.add_argument("--json", metavar="FILE", help="Also write the results as JSON.")
    _add_config_flags(
        b,
        skip={
            "methods",
            "batch_size",
            "seeds",
            "orders",
            "tasks",
            "results_dir",
            "tracking_uri",
            "experiment",
            "suite",
            "wait_for_lock",
            "checkpoint_every",
            "eval_scope",
        },
    )
    b.set_defaults(func="cmd_bench")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="harness", description="Continual-learning harness: LoRI vs LoRA adapters on task sequences."
    )
    p.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _training_commands(sub)
    _report_commands(sub)  # then the commands over results, in --help order
    _evidence_commands(sub)
    _server_commands(sub)
    _sequence_folder_commands(sub)
    _bench_command(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    # Deprecation chatter from transformers' internals says nothing actionable to a harness user.
    warnings.filterwarnings("ignore", category=FutureWarning)
    for noisy in (
        "lm_eval",
        "lm-eval",
        "mlflow",
        "alembic",
        "transformers",
        "peft",
        "httpx",
        "urllib3",
        "ray",
        "submitit",
    ):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if not downloads_allowed():
        # lm-eval and datasets only look at HF_HUB_OFFLINE: make "downloads off" hold for them too.
        os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        load_client_credentials()  # HARNESS_TRACKING_CREDENTIALS: the tracking server's `runs` user, for MLflow's client
        from harness import commands  # lazy: see the module docstring (startup of --help and of bad flags)

        return int(getattr(commands, args.func)(args) or 0)
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # a full disk outside the atomic writes (a figure, a log): the same one message, exit 2
        err = disk_full_error(exc)
        if err is None:
            raise
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt as exc:
        print(interrupted_message(exc), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
