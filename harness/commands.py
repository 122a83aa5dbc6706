"""What each `harness` subcommand does (cli.py parses the flags and calls these)."""

from __future__ import annotations

import argparse
import json
import statistics as st
import sys
from pathlib import Path
from typing import Any

from harness import distributed
from harness.analysis.numbers import json_clean
from harness.config_loading import cli_fields, load_config, parse_cli_value
from harness.errors import ConfigError, HarnessError
from harness.io import atomic_write_text
from harness.launchers import run_sequences
from harness.launchers.merge_jobs import run_merge_jobs
from harness.methods import METHODS
from harness.report import write_report
from harness.run.console import install_signal_handlers
from harness.run.export import export_adapter
from harness.run.folder import config_knobs, experiment_of, sequence_folders, verify_folder
from harness.run.lineage import register_export, registration_target
from harness.run.merge import run_merge
from harness.run.mirror import is_behind
from harness.run.planning import experiment_dir, validate
from harness.run.sync import catch_up_folders, sync_path
from harness.suites import list_suites, load_suite, validate_suite
from harness.tools import tables as published_tables
from harness.tools.bench import format_table, run_bench, write_json
from harness.tools.dashboard import serve_dashboard
from harness.tools.eval_bench import format_eval_table, run_eval_bench, run_eval_modes
from harness.tools.evidence import collect as collect_evidence
from harness.tools.plan_seeds import format_plan
from harness.tools.plan_seeds import plan as plan_seeds
from harness.tools.tracking_server import serve_tracking_server
from harness.tools.tuning import collect as collect_tuning
from harness.tools.tuning import format_tuning, markdown_tuning
from harness.tools.tuning import pending as pending_tuning
from harness.tools.verify import verify_path
from harness.tracking.client import default_tracking_uri, mark_interrupted


def overrides(args: argparse.Namespace) -> dict:
    """The experiment knobs given as flags, parsed as the config expects them."""
    knobs = {name for name, _ in cli_fields()}
    return {k: parse_cli_value(k, v) for k, v in vars(args).items() if k in knobs}


def _print_table(results: list[dict]) -> None:
    by: dict[str, list[dict]] = {}
    for r in results:
        key = f"{r['method']} [{r['variant']}]" if r.get("variant") else r["method"]
        by.setdefault(key, []).append(r)
    cols = [("acc", "ACC"), ("bwt", "BWT"), ("fwt", "FWT"), ("forgetting", "Forgetting")]
    width = max([10, *(len(k) + 2 for k in by)])
    head = (
        f"{'method':<{width}}"
        + "".join(f"{c[1]:>16}" for c in cols)
        + f"{'trainable':>14}{'LoRA-equiv':>14}{'runs':>6}"
    )
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
    cfg = load_config(args.config, overrides(args))
    install_signal_handlers()
    results = run_sequences(cfg, progress=not args.no_progress)
    return _after_run(cfg, results, args)


def _after_run(cfg, results, args) -> int:
    if not distributed.is_main():  # under torchrun every rank has the results; rank 0 alone prints and reports
        return 0

    print()
    _print_table(results)
    print()
    print(f"run folders: {experiment_dir(cfg)}")
    print(f"MLflow store: {default_tracking_uri(Path(cfg.results_dir), cfg.tracking_uri)}  (browse: make dashboard)")
    if not getattr(args, "no_report", False):
        if any(is_behind(f) for f in sequence_folders(experiment_dir(cfg))):
            print(
                "report: not written now: the tracking server was away and MLflow is behind the run folders. Once it "
                f"answers, `harness report {cfg.experiment_name} --results-dir {cfg.results_dir}` catches it up and writes it."
            )
            return 0
        index = write_report(cfg.experiment_name, Path(cfg.results_dir), cfg.tracking_uri)
        print(f"report: {index}")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise HarnessError(
            f"{run_dir}: no config.yaml here. Pass a sequence folder (results/<experiment>/<method>/seed-<s>[/order-<k>]) "
            "or an experiment folder (results/<experiment>)."
        )
    data, seq = config_knobs(cfg_path)
    # The folder's own location wins over a results_dir recorded elsewhere (folders can be moved):
    # the results folder is the parent of the experiment folder, wherever RUN_DIR sits below it.
    name = load_config(None, {**data, "results_dir": "."}).experiment_name
    # The nearest folder of that name holding the experiment's config.yaml: a method folder may share the name
    # (experiment osf, method osf: results/osf/osf/seed-0), and only the experiment folder has a config.yaml there.
    exp_dir = next(
        (
            p
            for p in [run_dir.resolve(), *run_dir.resolve().parents]
            if p.name == name and (p / "config.yaml").is_file()
        ),
        None,
    )
    if exp_dir is None:
        raise HarnessError(
            f"{run_dir}: not inside an experiment folder named {name!r}; pass the folder `harness run` wrote."
        )
    data["results_dir"] = str(exp_dir.parent)
    # The recorded config is the whole experiment's (every method, seed, order and grid): the folder
    # layout is planned from it, and one sequence is picked out, never the plan narrowed.
    cfg = load_config(None, {**data, **overrides(args)})
    install_signal_handlers()
    results = run_sequences(cfg, progress=not args.no_progress, only=run_dir if seq else None)
    return _after_run(cfg, results, args)


def cmd_merge(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, overrides(args))
    if cfg.launcher != "local":
        raise ConfigError(
            f"--launcher {cfg.launcher}: `harness merge` runs its jobs in this process only so far; "
            "pass --launcher local (sequences of `harness run` go to Ray and Slurm)."
        )
    install_signal_handlers()
    results = run_merge(cfg, progress=not args.no_progress) if cfg.jobs == 1 else run_merge_jobs(cfg)
    print()
    print(f"{'method':<8}{'seed':>5}  {'combination':<16}{'norm. acc':>10}{'avg drop':>10}{'ΔW rel. err':>13}")
    for r in results:
        for c, v in r["merges"].items():
            fmt = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
            print(
                f"{r['method']:<8}{r['seed']:>5}  {c:<16}{fmt(v['normalised_accuracy']):>10}{fmt(v['average_drop']):>10}"
                f"{v['relative_error']:>13.2e}"
            )
    print(f"\nmerge folders: {experiment_dir(cfg) / 'merge'}")
    if not args.no_report:
        print(f"report: {write_report(cfg.experiment_name, Path(cfg.results_dir), cfg.tracking_uri)}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    flags = overrides(args)
    if args.config is None and set(flags) <= {"suite"} and "suite" in flags:
        # `harness validate --suite X`: the suite alone, thoroughly (data, labels, lm-eval tasks).
        suite = validate_suite(flags["suite"])
        print(f"suite {suite.name}: OK ({len(suite.tasks)} tasks, {len(suite.orders)} order(s)) at {suite.path}")
        for note in getattr(suite, "validation_notes", []) or []:
            print(f"  note: {note}")
        return 0

    cfg = load_config(args.config, flags)
    suite, specs, uri, _ = validate(cfg)
    print(
        f"config OK: experiment {cfg.experiment_name}, {len(specs)} sequence(s) of {len(specs[0].tasks)} tasks, "
        f"suite {suite.name}, model {cfg.model}, tracking {uri}"
    )
    return 0


def _tuned_strengths() -> dict[str, dict[str, Any]]:
    """knob ("ewc.lambda") -> {suite: value} from the bundled suites' method_knobs (make tune-baselines)."""
    out: dict[str, dict[str, Any]] = {}
    for row in list_suites():
        if "error" not in row:
            for section, knobs in load_suite(row["name"]).method_knobs.items():
                for k, v in knobs.items():
                    out.setdefault(f"{section}.{k}", {})[row["name"]] = v
    return out


def cmd_methods(args: argparse.Namespace) -> int:
    tuned = _tuned_strengths()
    for m in METHODS.values():
        print(f"{m.name:<9} {m.summary}")
        print(f"{'':<9} source: {m.source}")
        print(
            f"{'':<9} learning rate: --lr-{m.lr_method}" + ("   (a reference row, not ranked)" if m.reference else "")
        )
        if m.strength:
            values = ", ".join(f"{suite} {v}" for suite, v in sorted(tuned.get(m.strength, {}).items())) or "none yet"
            print(
                f"{'':<9} strength: {m.strength}, tuned on the validation split per suite (make tune-baselines): {values}"
            )
        if m.knobs is not None:
            for k, f in m.knobs.model_fields.items():
                k = f.alias or k  # ewc.lambda
                print(
                    f"{'':<9} --{m.section}-{k.replace('_', '-')} (YAML {m.section}.{k}, default {f.default}): {f.description}"
                )
        print()
    return 0


def cmd_suites(args: argparse.Namespace) -> int:
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
    root = Path(args.results_dir) / args.experiment if args.experiment else Path(args.results_dir)
    for folder in sequence_folders(root):  # the report must not rest on a damaged folder (IntegrityError: exit 2)
        verify_folder(folder)
    for line in catch_up_folders(root):  # runs that went on while the tracking server was away
        print(line, file=sys.stderr)
    mark_interrupted(default_tracking_uri(Path(args.results_dir), args.tracking_uri), args.experiment)
    index = write_report(args.experiment, Path(args.results_dir), args.tracking_uri, baseline=args.baseline)
    print(f"report: {index}")
    return 0


def cmd_plan_seeds(args: argparse.Namespace) -> int:
    methods = tuple(m.strip() for m in args.plan_methods.split(",") if m.strip())
    if len(methods) != 2 or methods[0] == methods[1]:
        raise HarnessError(f"--methods {args.plan_methods}: name two different methods, e.g. --methods lori-s,lora")
    rows = plan_seeds(args.experiment, Path(args.results_dir), methods, args.tracking_uri)
    print(format_plan(methods, rows))
    if args.plan_json:
        atomic_write_text(
            Path(args.plan_json), json.dumps(json_clean({"methods": list(methods), "metrics": rows}), indent=1)
        )
    return 0


def cmd_evidence(args: argparse.Namespace) -> int:
    for folder in collect_evidence(Path(args.run_folder), args.table):
        print(f"evidence: {folder}")
    return 0


def cmd_tuning(args: argparse.Namespace) -> int:
    if args.pending:
        print(pending_tuning(args.pending, args.suite))
        return 0
    result = collect_tuning(Path(args.run_folder or f"results/tune-{args.suite}/tune-{args.suite}"), args.suite)
    print(markdown_tuning(result) if args.markdown else format_tuning(result))
    return 0


def cmd_tables(args: argparse.Namespace) -> int:
    if args.check:
        differ = published_tables.stale()
        for line in differ:
            print(f"differs from the evidence: {line} (run `make tables`)", file=sys.stderr)
        return 1 if differ else 0
    for f in published_tables.write():
        print(f"rewrote {f}")
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    mark_interrupted(default_tracking_uri(Path(args.results_dir), args.tracking_uri), None)

    return serve_dashboard(Path(args.results_dir), port=args.port, tracking_uri=args.tracking_uri)


def cmd_tracking_server(args: argparse.Namespace) -> int:
    return serve_tracking_server(
        Path(args.results_dir), port=args.port, backend_uri=args.backend_uri, host=args.host, auth=args.auth
    )


def cmd_export(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    if args.register:
        registration_target(run_dir, args.tracking_uri)  # refused before anything is written
    out = export_adapter(run_dir, Path(args.out), args.stage)
    print(f"wrote a PEFT adapter to {out}: PeftModel.from_pretrained(base_model, {str(out)!r})")
    if args.register:
        print(register_export(run_dir, args.stage, args.register, experiment_of(run_dir), args.tracking_uri))
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    for line in sync_path(Path(args.run_dir), args.tracking_uri):
        print(line)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    text, ok = verify_path(Path(args.run_dir), args.tracking_uri)
    print(text)
    return 0 if ok else 1


def cmd_bench(args: argparse.Namespace) -> int:
    methods = tuple(m.strip() for m in args.bench_methods.split(",") if m.strip())
    bad = [m for m in methods if m not in ("base", "peft-bare") and m not in METHODS]
    if bad:
        raise HarnessError(f"--methods: unknown {bad}; choose from base, peft-bare, {', '.join(METHODS)}")
    cfg = load_config(None, overrides(args))
    if args.stage_hooks:
        from harness.tools.stage_hooks_bench import format_stage_hooks, run_stage_hooks  # lazy: only this mode needs it

        res = run_stage_hooks(
            cfg,
            methods=tuple(m for m in methods if m not in ("base", "peft-bare")),
            suite_name=args.stage_hooks,
            steps=args.steps,
        )
        print(format_stage_hooks(res))
        if args.json:
            write_json(res, Path(args.json))
        return 0
    if args.eval_suite and not args.eval_bare:
        modes = tuple(m.strip() for m in args.eval_modes.split(",") if m.strip())
        res = run_eval_modes(
            cfg,
            suite=args.eval_suite,
            modes=modes,
            adapter=Path(args.adapter) if args.adapter else None,
            repeats=args.eval_repeats,
            progress=True,
        )
        print(format_eval_table(res))
        if args.json:
            write_json(res, Path(args.json))
        return 0
    if args.eval_suite:
        res = run_eval_bench(
            cfg.model,
            args.eval_suite,
            batch_size=cfg.eval_batch_size,
            limit=cfg.eval_limit,
            device=cfg.device,
            dtype=cfg.dtype,
        )
        for kind in ("loglikelihood", "generate_until"):
            if kind in res:
                r = res[kind]
                print(
                    f"{kind:<15} {res['requests'][kind]:>5} requests  lm-eval {r['lm_eval_s']:.1f}s  bare {r['bare_s']:.1f}s  "
                    f"lm-eval throughput = {100 * r['lm_eval_throughput_vs_bare']:.0f}% of bare"
                )
        if args.json:
            write_json(res, Path(args.json))
        return 0
    res = run_bench(
        cfg,
        methods=methods,
        batch_size=args.bench_batch_size,
        seq_len=args.seq_len,
        steps=args.steps,
        memory=args.memory,
        profile=args.profile,
    )
    print(format_table(res))
    if args.json:
        write_json(res, Path(args.json))
        print(f"wrote {args.json}")
    return 0
