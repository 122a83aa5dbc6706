"""`harness` command line. Flags for `run` and `validate` are generated from ExperimentConfig."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from harness.errors import HarnessError, interrupted_message


def _add_config_flags(p: argparse.ArgumentParser, skip: set[str] = frozenset()) -> None:
    from harness.config import cli_fields

    g = p.add_argument_group("experiment knobs (override the YAML config; lists are comma-separated)")
    for name, field in cli_fields():
        if name in skip:
            continue
        default = field.default
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        flag = name.replace(".", "-").replace("_", "-")
        g.add_argument(f"--{flag}", dest=name, default=argparse.SUPPRESS, metavar=flag.upper(),
                       help=f"{field.description} [default: {shown}]".replace("%", "%%"))


def _overrides(args: argparse.Namespace) -> dict:
    from harness.config import cli_fields, parse_cli_value

    knobs = {name for name, _ in cli_fields()}
    return {k: parse_cli_value(k, v) for k, v in vars(args).items() if k in knobs}


def _print_table(results: list[dict]) -> None:
    import statistics as st

    by: dict[str, list[dict]] = {}
    for r in results:
        key = f"{r['method']} [{r['variant']}]" if r.get("variant") else r["method"]
        by.setdefault(key, []).append(r)
    cols = [("acc", "ACC"), ("bwt", "BWT"), ("fwt", "FWT"), ("forgetting", "Forgetting")]
    width = max([10, *(len(k) + 2 for k in by)])
    head = f"{'method':<{width}}" + "".join(f"{c[1]:>16}" for c in cols) + f"{'trainable':>14}{'LoRA-equiv':>14}{'runs':>6}"
    print(head)
    print("-" * len(head))
    for method, rs in by.items():
        cells = []
        for key, _ in cols:
            vals = [r[key] for r in rs if r.get(key) is not None]
            if not vals:
                cells.append(f"{'n/a':>16}")
            elif len(vals) == 1:
                cells.append(f"{vals[0]:>16.3f}")
            else:
                cells.append(f"{st.mean(vals):>9.3f} ± {st.stdev(vals):.3f}")
        eff = rs[0].get("trainable_params_effective", 0)
        lora = rs[0].get("trainable_params_lora_equivalent", 0)
        ref = "  reference (multi-task upper bound, not ranked)" if rs[0].get("reference") else ""
        print(f"{method:<{width}}" + "".join(cells) + f"{eff:>14,}{lora:>14,}{len(rs):>6}{ref}")
    variants = {r["variant"]: r.get("variant_values") for r in results if r.get("variant")}
    for vid, values in variants.items():
        print(f"  [{vid}] " + ", ".join(f"{k}={v}" for k, v in (values or {}).items()))


def cmd_run(args: argparse.Namespace) -> int:
    from harness.config import load_config
    from harness.launchers import run_sequences
    from harness.scheduler import install_signal_handlers

    cfg = load_config(args.config, _overrides(args))
    install_signal_handlers()
    results = run_sequences(cfg, progress=not args.no_progress)
    return _after_run(cfg, results, args)


def _after_run(cfg, results, args) -> int:
    from harness import distributed

    if not distributed.is_main():  # under torchrun every rank has the results; rank 0 alone prints and reports
        return 0
    from harness.planning import experiment_dir
    from harness.tracking import default_tracking_uri

    print()
    _print_table(results)
    print()
    print(f"run folders: {experiment_dir(cfg)}")
    print(f"MLflow store: {default_tracking_uri(Path(cfg.results_dir), cfg.tracking_uri)}  (browse: make dashboard)")
    if not getattr(args, "no_report", False):
        from harness.mirror import is_behind
        from harness.report import write_report
        from harness.sequence_files import sequence_folders

        if any(is_behind(f) for f in sequence_folders(experiment_dir(cfg))):
            print("report: not written now: the tracking server was away and MLflow is behind the run folders. Once it "
                  f"answers, `harness report {cfg.experiment_name} --results-dir {cfg.results_dir}` catches it up and writes it.")
            return 0
        index = write_report(cfg.experiment_name, Path(cfg.results_dir), cfg.tracking_uri)
        print(f"report: {index}")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from harness.config import load_config
    from harness.launchers import run_sequences
    from harness.scheduler import install_signal_handlers
    from harness.sequence_files import config_knobs

    run_dir = Path(args.run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise HarnessError(f"{run_dir}: no config.yaml here. Pass a sequence folder (results/<experiment>/<method>/seed-<s>[/order-<k>]) "
                           "or an experiment folder (results/<experiment>).")
    data, seq = config_knobs(cfg_path)
    # The folder's own location wins over a results_dir recorded elsewhere (folders can be moved):
    # the results folder is the parent of the experiment folder, wherever RUN_DIR sits below it.
    name = load_config(None, {**data, "results_dir": "."}).experiment_name
    exp_dir = next((p for p in [run_dir.resolve(), *run_dir.resolve().parents] if p.name == name), None)
    if exp_dir is None:
        raise HarnessError(f"{run_dir}: not inside an experiment folder named {name!r}; pass the folder `harness run` wrote.")
    data["results_dir"] = str(exp_dir.parent)
    # The recorded config is the whole experiment's (every method, seed, order and grid): the folder
    # layout is planned from it, and one sequence is picked out, never the plan narrowed.
    cfg = load_config(None, {**data, **_overrides(args)})
    install_signal_handlers()
    results = run_sequences(cfg, progress=not args.no_progress, only=run_dir if seq else None)
    return _after_run(cfg, results, args)


def cmd_merge(args: argparse.Namespace) -> int:
    from harness.config import load_config
    from harness.merging.protocol import run_merge
    from harness.planning import experiment_dir
    from harness.scheduler import install_signal_handlers

    cfg = load_config(args.config, _overrides(args))
    if cfg.launcher != "local":
        from harness.errors import ConfigError

        raise ConfigError(f"--launcher {cfg.launcher}: `harness merge` runs its jobs in this process only so far; "
                          "pass --launcher local (sequences of `harness run` go to Ray and Slurm).")
    install_signal_handlers()
    results = run_merge(cfg, progress=not args.no_progress)
    print()
    print(f"{'method':<8}{'seed':>5}  {'combination':<16}{'norm. acc':>10}{'avg drop':>10}{'ΔW rel. err':>13}")
    for r in results:
        for c, v in r["merges"].items():
            fmt = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
            print(f"{r['method']:<8}{r['seed']:>5}  {c:<16}{fmt(v['normalised_accuracy']):>10}{fmt(v['average_drop']):>10}"
                  f"{v['relative_error']:>13.2e}")
    print(f"\nmerge folders: {experiment_dir(cfg) / 'merge'}")
    if not args.no_report:
        from harness.report import write_report

        print(f"report: {write_report(cfg.experiment_name, Path(cfg.results_dir), cfg.tracking_uri)}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from harness.suites import validate_suite

    overrides = _overrides(args)
    if args.config is None and set(overrides) <= {"suite"} and "suite" in overrides:
        # `harness validate --suite X`: the suite alone, thoroughly (data, labels, lm-eval tasks).
        suite = validate_suite(overrides["suite"])
        print(f"suite {suite.name}: OK ({len(suite.tasks)} tasks, {len(suite.orders)} order(s)) at {suite.path}")
        for note in getattr(suite, "validation_notes", []) or []:
            print(f"  note: {note}")
        return 0
    from harness.config import load_config
    from harness.planning import validate

    cfg = load_config(args.config, overrides)
    suite, specs, uri, _ = validate(cfg)
    print(f"config OK: experiment {cfg.experiment_name}, {len(specs)} sequence(s) of {len(specs[0].tasks)} tasks, "
          f"suite {suite.name}, model {cfg.model}, tracking {uri}")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from harness.methods import METHODS

    for m in METHODS.values():
        print(f"{m.name:<9} {m.summary}")
        print(f"{'':<9} source: {m.source}")
        print(f"{'':<9} learning rate: --lr-{m.lr_method}" + ("   (a reference row, not ranked)" if m.reference else ""))
        if m.knobs is not None:
            for k, f in m.knobs.model_fields.items():
                k = f.alias or k  # ewc.lambda
                print(f"{'':<9} --{m.section}-{k.replace('_', '-')} (YAML {m.section}.{k}, default {f.default}): {f.description}")
        print()
    return 0


def cmd_suites(args: argparse.Namespace) -> int:
    from harness.suites import list_suites

    rows = list_suites()
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    print(f"{'suite':<16}{'tasks':>6}{'orders':>8}  description")
    for r in rows:
        desc = (r.get("description") or "").strip().split("\n")[0][:70]
        print(f"{r['name']:<16}{r['n_tasks']:>6}{r['n_orders']:>8}  {desc}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from harness.report import write_report
    from harness.mirror import catch_up_folders
    from harness.sequence_files import sequence_folders, verify_folder
    from harness.tracking import default_tracking_uri, mark_interrupted

    root = Path(args.results_dir) / args.experiment if args.experiment else Path(args.results_dir)
    for folder in sequence_folders(root):  # the report must not rest on a damaged folder (IntegrityError: exit 2)
        verify_folder(folder)
    for line in catch_up_folders(root):  # runs that went on while the tracking server was away
        print(line, file=sys.stderr)
    mark_interrupted(default_tracking_uri(Path(args.results_dir), args.tracking_uri), args.experiment)
    index = write_report(args.experiment, Path(args.results_dir), args.tracking_uri)
    print(f"report: {index}")
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from harness.dashboard import serve_dashboard
    from harness.tracking import default_tracking_uri, mark_interrupted

    mark_interrupted(default_tracking_uri(Path(args.results_dir), args.tracking_uri), None)

    return serve_dashboard(Path(args.results_dir), port=args.port, tracking_uri=args.tracking_uri)


def cmd_tracking_server(args: argparse.Namespace) -> int:
    from harness.tracking_server import serve_tracking_server

    return serve_tracking_server(Path(args.results_dir), port=args.port, backend_uri=args.backend_uri, host=args.host, auth=args.auth)


def cmd_export(args: argparse.Namespace) -> int:
    from harness.export import export_adapter
    from harness.lineage import register_export, registration_target
    from harness.sequence_files import experiment_of

    run_dir = Path(args.run_dir)
    if args.register:
        registration_target(run_dir, args.tracking_uri)  # refused before anything is written
    out = export_adapter(run_dir, Path(args.out), args.stage)
    print(f"wrote a PEFT adapter to {out}: PeftModel.from_pretrained(base_model, {str(out)!r})")
    if args.register:
        print(register_export(run_dir, args.stage, args.register, experiment_of(run_dir), args.tracking_uri))
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    from harness.mirror import sync_path

    for line in sync_path(Path(args.run_dir), args.tracking_uri):
        print(line)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from harness.verify import verify_path

    text, ok = verify_path(Path(args.run_dir), args.tracking_uri)
    print(text)
    return 0 if ok else 1


def cmd_bench(args: argparse.Namespace) -> int:
    from harness.bench import format_table, run_bench, write_json
    from harness.config import load_config
    from harness.methods import METHODS

    methods = tuple(m.strip() for m in args.bench_methods.split(",") if m.strip())
    bad = [m for m in methods if m not in ("base", "peft-bare") and m not in METHODS]
    if bad:
        raise HarnessError(f"--methods: unknown {bad}; choose from base, peft-bare, {', '.join(METHODS)}")
    cfg = load_config(None, _overrides(args))
    if args.eval_suite and not args.eval_bare:
        from harness.eval_bench import format_eval_table, run_eval_modes

        modes = tuple(m.strip() for m in args.eval_modes.split(",") if m.strip())
        res = run_eval_modes(cfg, suite=args.eval_suite, modes=modes, adapter=Path(args.adapter) if args.adapter else None,
                             repeats=args.eval_repeats, progress=True)
        print(format_eval_table(res))
        if args.json:
            write_json(res, Path(args.json))
        return 0
    if args.eval_suite:
        from harness.eval_bench import run_eval_bench

        res = run_eval_bench(cfg.model, args.eval_suite, batch_size=cfg.eval_batch_size, limit=cfg.eval_limit,
                             device=cfg.device, dtype=cfg.dtype)
        for kind in ("loglikelihood", "generate_until"):
            if kind in res:
                r = res[kind]
                print(f"{kind:<15} {res['requests'][kind]:>5} requests  lm-eval {r['lm_eval_s']:.1f}s  bare {r['bare_s']:.1f}s  "
                      f"lm-eval throughput = {100 * r['lm_eval_throughput_vs_bare']:.0f}% of bare")
        if args.json:
            write_json(res, Path(args.json))
        return 0
    res = run_bench(cfg, methods=methods, batch_size=args.bench_batch_size, seq_len=args.seq_len, steps=args.steps,
                    memory=args.memory, profile=args.profile)
    print(format_table(res))
    if args.json:
        write_json(res, Path(args.json))
        print(f"wrote {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="harness", description="Continual-learning harness: LoRI vs LoRA adapters on task sequences.")
    p.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def training_command(name: str, help_: str, func, positional: tuple[str, str, str | None]) -> None:
        c = sub.add_parser(name, help=help_)
        c.add_argument(positional[0], nargs=positional[2], metavar=positional[0].upper(), help=positional[1])
        c.add_argument("--no-report", action="store_true", help="Do not write the report at the end.")
        c.add_argument("--no-progress", action="store_true", help="No progress bars.")
        _add_config_flags(c)
        c.set_defaults(func=func)

    config_arg = ("config", "Experiment YAML (optional; flags override it).", "?")
    training_command("run", "Run an experiment (every method x seed x task order); finished stages are skipped.", cmd_run, config_arg)
    training_command("resume", "Continue an interrupted run from its folder (sequence or experiment folder).", cmd_resume,
                     ("run_dir", "A sequence folder or an experiment folder.", None))
    training_command("merge", "Train one adapter per task, evaluate each alone, merge them (PEFT), evaluate the merges.", cmd_merge,
                     config_arg)

    v = sub.add_parser("validate", help="Check a config (suite, model, capacity, paths, tracking) without training; with only --suite, check that suite.")
    v.add_argument("config", nargs="?", help="Experiment YAML (optional).")
    _add_config_flags(v)
    v.set_defaults(func=cmd_validate)

    m = sub.add_parser("methods", help="List the continual-learning methods: description, source, knobs.")
    m.set_defaults(func=cmd_methods)

    s = sub.add_parser("suites", help="List the task suites.")
    s.add_argument("--json", action="store_true", help="Machine-readable output.")
    s.set_defaults(func=cmd_suites)

    rep = sub.add_parser("report", help="Write the forgetting report (HTML + PNG + CSV/JSON) from the MLflow store.")
    rep.add_argument("experiment", nargs="?", help="Experiment name (default: the only one in the store).")
    rep.add_argument("--results-dir", default="results", help="Results folder [default: results].")
    rep.add_argument("--tracking-uri", default=None, help="MLflow tracking URI [default: MLFLOW_TRACKING_URI or the sqlite store].")
    rep.set_defaults(func=cmd_report)

    d = sub.add_parser("dashboard", help="Serve the MLflow UI over the results store on 127.0.0.1.")
    d.add_argument("--results-dir", default="results", help="Results folder [default: results].")
    d.add_argument("--port", type=int, default=5000, help="Port [default: 5000].")
    d.add_argument("--tracking-uri", default=None, help="Store to serve [default: the sqlite store under --results-dir].")
    d.set_defaults(func=cmd_dashboard)
    ts = sub.add_parser("tracking-server", help="Run a shared MLflow tracking server on PostgreSQL until Ctrl-C (--host and --auth for several machines).")
    ts.add_argument("--results-dir", default="results", help="Results folder: PostgreSQL data and artifacts live under it [default: results].")
    ts.add_argument("--port", type=int, default=5001, help="Port of the MLflow server [default: 5001].")
    ts.add_argument("--host", default="127.0.0.1", help="Address to bind, e.g. 0.0.0.0 for the jobs of several machines "
                                                        "(anything but loopback needs --auth) [default: 127.0.0.1].")
    ts.add_argument("--auth", action="store_true", help="MLflow's basic-auth: an admin password generated once and a `runs` user "
                                                        "for the jobs, kept (mode 600) under <results-dir>/auth.")
    ts.add_argument("--backend-uri", default=None,
                    help="Use this existing PostgreSQL URI (postgresql+psycopg://...) instead of starting one [default: start Debian's PostgreSQL].")
    ts.set_defaults(func=cmd_tracking_server)

    e = sub.add_parser("export", help="Write a sequence's adapter at a committed stage as a stock PEFT folder "
                                      "(adapter_config.json + adapter_model.safetensors).")
    e.add_argument("run_dir", metavar="RUN_DIR", help="A sequence folder: results/<experiment>/<method>/seed-<s>[/order-<k>].")
    e.add_argument("out", metavar="OUT", help="Folder to write: new or empty (never overwritten).")
    e.add_argument("--stage", type=int, default=None, metavar="T", help="Committed stage to export [default: the last committed one].")
    e.add_argument("--register", default=None, metavar="NAME", help="Also register the stage's adapter (its MLflow model) as a "
                   "new version of registered model NAME, linked to the sequence's parent run.")
    e.add_argument("--tracking-uri", default=None, help="With --register: the store [default: the one in the folder's state.json].")
    e.set_defaults(func=cmd_export)

    sy = sub.add_parser("sync", help="Mirror run folders into MLflow now (what an outage of the tracking server kept from it).")
    sy.add_argument("run_dir", metavar="RUN_DIR", help="A sequence folder, or a folder above sequence folders (an experiment).")
    sy.add_argument("--tracking-uri", default=None, help="Store to mirror into [default: the one in each state.json].")
    sy.set_defaults(func=cmd_sync)

    ver = sub.add_parser("verify", help="Check a run folder: file hashes, LoRI-S mask invariants, metrics recomputed from the "
                                        "matrix, MLflow against the folder. Exit 0 when all hold, 1 otherwise.")
    ver.add_argument("run_dir", metavar="RUN_DIR", help="A sequence folder, or a folder above sequence folders (an experiment).")
    ver.add_argument("--tracking-uri", default=None, help="MLflow store to compare with [default: the one in each state.json].")
    ver.set_defaults(func=cmd_verify)

    b = sub.add_parser("bench", help="Median step time and tokens/s of each method's real training step, and a bare base-model step.")
    b.add_argument("--methods", dest="bench_methods", default="base,peft-bare,lora,lori-d,lori-s",
                   help="Comma-separated: base (bare base step), peft-bare (a bare PEFT LoRA loop, no harness code) and any "
                        "method; with --compile MODE each method is also timed compiled [default: base,peft-bare,lora,lori-d,lori-s].")
    b.add_argument("--profile", action="store_true",
                   help="Also profile each row (torch.profiler): aten ops, kernels, host vs device time, synchronisations per step.")
    b.add_argument("--batch-size", dest="bench_batch_size", type=int, default=8, help="Batch size [default: 8].")
    b.add_argument("--seq-len", type=int, default=128, help="Tokens per sequence [default: 128].")
    b.add_argument("--steps", type=int, default=10, help="Timed steps per method after 2 warm-up steps [default: 10].")
    b.add_argument("--memory", action="store_true",
                   help="Also measure adapter training memory per method (params, grads, optimizer state, snapshots) from the tensors.")
    b.add_argument("--eval-suite", metavar="SUITE",
                   help="Instead: time lm-eval on this suite's tasks through PEFT, with the adapters folded (eval_merged) and under "
                        "bf16 autocast, and how far their answers agree.")
    b.add_argument("--eval-modes", default="peft_fp32,merged_fp32,merged_bf16",
                   help="With --eval-suite: modes to time, of peft_fp32, merged_fp32, merged_bf16, peft_bf16 "
                        "[default: peft_fp32,merged_fp32,merged_bf16].")
    b.add_argument("--eval-repeats", type=int, default=1, help="With --eval-suite: interleaved runs per mode; seconds = median [default: 1].")
    b.add_argument("--adapter", metavar="FOLDER",
                   help="With --eval-suite: a PEFT adapter folder (e.g. from harness export) instead of a seeded adapter.")
    b.add_argument("--eval-bare", action="store_true",
                   help="With --eval-suite: instead, time lm-eval against a bare batched scorer on the same requests.")
    b.add_argument("--json", metavar="FILE", help="Also write the results as JSON.")
    _add_config_flags(b, skip={"methods", "batch_size", "seeds", "orders", "tasks", "results_dir", "tracking_uri", "experiment",
                               "suite", "wait_for_lock", "checkpoint_every", "eval_scope"})
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Deprecation chatter from transformers' internals says nothing actionable to a harness user.
    warnings.filterwarnings("ignore", category=FutureWarning)
    for noisy in ("lm_eval", "lm-eval", "mlflow", "alembic", "transformers", "peft", "httpx", "urllib3", "ray", "submitit"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from harness.models import downloads_allowed
    from harness.tracking_auth import load_client_credentials

    if not downloads_allowed():
        # lm-eval and datasets only look at HF_HUB_OFFLINE: make "downloads off" hold for them too.
        os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        load_client_credentials()  # HARNESS_TRACKING_CREDENTIALS: the tracking server's `runs` user, for MLflow's client
        return int(args.func(args) or 0)
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # a full disk outside the atomic writes (a figure, a log): the same one message, exit 2
        from harness.io import disk_full_error

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
