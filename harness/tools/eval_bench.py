"""`harness bench --eval-suite`: what evaluating through PEFT, folded weights and bf16 autocast costs, and changes.

Nothing is trained. The model gets a seeded LoRA-like adapter (rank, alpha, targets and A's init
from the experiment config; B non-zero, scaled so that ‖ΔW‖_F = relative_delta·‖W0‖_F per module,
so every module's output really moves) or loads a trained one, then lm-eval scores the suite's
tasks exactly as the scheduler calls it, once per mode:

    peft_fp32     the adapters through PEFT's LoRA layers (the reference)
    merged_fp32   eval_merged: the adapters folded into the weights
    merged_bf16   eval_merged + eval_bf16 (CPU bf16 autocast)
    peft_bf16     eval_bf16 alone (not in the default set)

Per mode: wall seconds (median of `repeats` interleaved runs), speed-up over the reference, per-task scores, and per-task agreement with
the reference: the fraction of documents with the same prediction (choice ranked first, or the
same generated text) and, for multiple choice, the largest log-likelihood difference. One untimed
warm-up on two documents per task first, so no mode pays for loading the data.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from harness.adapters.combine import load_adapters
from harness.adapters.peft_folder import CONFIG
from harness.adapters.sequence import AdapterSequence
from harness.errors import HarnessError
from harness.io import read_json
from harness.models import load_model, set_torch_threads
from harness.run.evaluate import Evaluator
from harness.suites import load_suite
from harness.suites.lm_eval_configs import task_manager

MODES = {  # name -> (merged, bf16)
    "peft_fp32": (False, False),
    "merged_fp32": (True, False),
    "merged_bf16": (True, True),
    "peft_bf16": (False, True),
}
DEFAULT_MODES = ("peft_fp32", "merged_fp32", "merged_bf16")
REFERENCE = "peft_fp32"


@torch.no_grad()
def seeded_adapter(model: torch.nn.Module, cfg, *, seed: int = 0, relative_delta: float = 0.05):
    """A PeftModel with one adapter: A as the methods seed it, B seeded Gaussian scaled to ‖ΔW‖ = relative_delta·‖W0‖."""

    seq = AdapterSequence(
        model, rank=cfg.rank, alpha=cfg.scale_alpha, targets=cfg.targets, a_init=cfg.a_init, seed=seed
    )
    name = seq.begin_task(1)
    g = torch.Generator().manual_seed(seed)
    for _, layer in seq.layers():
        B = layer.lora_B[name].weight
        B.copy_(torch.randn(tuple(B.shape), generator=g).to(B.dtype))
        delta = layer.get_delta_weight(name).float().norm()
        B.mul_(relative_delta * layer.get_base_layer().weight.float().norm() / delta)
    return seq.model


def load_adapter(model: torch.nn.Module, folder: Path):
    """A PeftModel from a PEFT adapter folder, or every adapter of a stage folder (adapters.json), all active."""
    folder = Path(folder)
    if (folder / "adapters.json").is_file():  # a sequence's stage folder: adapter/ and adapter/<name>/
        names = read_json(folder / "adapters.json")["adapters"]
        folders = {n: AdapterSequence.adapter_file(folder, n).parent for n in names}
        if not all((f / CONFIG).is_file() for f in folders.values()):  # e.g. LoRI-S: masks and values, not PEFT files
            raise HarnessError(
                f"{folder}: this stage folder holds the method's own files, not a PEFT adapter; "
                "write one with `harness export RUN_DIR --stage T OUT` and pass OUT"
            )
    elif (folder / CONFIG).is_file():
        names, folders = ["default"], {"default": folder}
    elif (folder / "stage.json").is_file():  # e.g. LoRI-S: masks and values only
        raise HarnessError(
            f"{folder}: this stage folder holds the method's own files, not a PEFT adapter; "
            "write one with `harness export RUN_DIR --stage T OUT` and pass OUT"
        )
    else:
        raise HarnessError(
            f"{folder}: neither a PEFT adapter folder (adapter_config.json) nor a stage folder "
            "(adapters.json); pass e.g. results/<experiment>/<method>/seed-0/stages/1-<task>"
        )
    peft = load_adapters(model, folders)
    peft.base_model.set_adapter(names)
    return peft


def agreement(ref: list[dict], other: list[dict]) -> dict:
    """Fraction of documents with the same prediction, and the largest log-likelihood difference (multiple choice)."""
    if [d["doc_id"] for d in ref] != [d["doc_id"] for d in other]:
        raise RuntimeError("the two evaluations scored different documents")
    same = sum(a["pred"] == b["pred"] for a, b in zip(ref, other))
    lls = [
        abs(x - y) for a, b in zip(ref, other) for x, y in zip(a.get("loglikelihoods", []), b.get("loglikelihoods", []))
    ]
    return {
        "documents": len(ref),
        "agree": same / len(ref) if ref else 1.0,
        "max_loglikelihood_diff": max(lls) if lls else None,
    }


def run_eval_modes(
    cfg,
    *,
    suite: str | None = None,
    modes: tuple[str, ...] = DEFAULT_MODES,
    adapter: Path | None = None,
    seed: int = 0,
    relative_delta: float = 0.05,
    repeats: int = 1,
    progress: bool = False,
) -> dict:
    """Time lm-eval on every task of the suite (default cfg.suite) with cfg.model in each mode; JSON-able result.

    Batch size, eval_limit, max length, device, dtype, rank, alpha, targets come from the experiment config.
    seconds: the median over `repeats` runs of each mode; agreement and scores: from the first run."""
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise HarnessError(f"eval bench modes {list(modes)}: unknown {bad}; choose from {', '.join(MODES)}")
    if repeats < 1:
        raise HarnessError(f"eval bench repeats {repeats}: give 1 or more")
    modes = (REFERENCE, *[m for m in modes if m != REFERENCE])
    set_torch_threads()
    s = load_suite(suite or cfg.suite)
    model, tok = load_model(
        cfg.model, device=cfg.device, dtype=cfg.dtype, cache_dir=cfg.cache_dir, trust_remote_code=cfg.trust_remote_code
    )
    if adapter is not None:
        model = load_adapter(model, adapter)
    else:
        model = seeded_adapter(model, cfg, seed=seed, relative_delta=relative_delta)
    tasks = s.task_names
    kw = dict(batch_size=cfg.eval_batch_size, max_length=cfg.eval_max_length, progress=progress)
    Evaluator(s, tok, limit=2, **kw).evaluate(model, tasks)  # warm-up: datasets built and cached, untimed
    ev = Evaluator(s, tok, limit=cfg.eval_limit, **kw)
    out = {
        "model": cfg.model,
        "suite": s.name,
        "device": str(next(model.parameters()).device),
        "tasks": tasks,
        "eval_limit": cfg.eval_limit,
        "batch_size": cfg.eval_batch_size,
        "reference": REFERENCE,
        "repeats": repeats,
        "adapter": {"source": str(adapter)}
        if adapter is not None
        else {
            "source": "seeded",
            "seed": seed,
            "relative_delta": relative_delta,
            "rank": cfg.rank,
            "alpha": cfg.scale_alpha,
            "targets": cfg.targets,
        },
        "modes": {},
    }
    results, seconds = {}, {m: [] for m in modes}
    for _ in range(repeats):  # modes interleaved, so a slow spell of the machine hits every mode alike
        for mode in modes:
            merged, bf16 = MODES[mode]
            r = ev.evaluate(model, tasks, merged=merged, bf16_autocast=bf16, log_samples=True)
            results.setdefault(mode, r)
            seconds[mode].append(r.wall_s)
    ref_s = statistics.median(seconds[REFERENCE])
    for mode in modes:
        r, ref = results[mode], results[REFERENCE]
        per_task = {t: {"score": r.scores[t], **agreement(ref.samples[t], r.samples[t])} for t in tasks}
        n = sum(p["documents"] for p in per_task.values())
        med = statistics.median(seconds[mode])
        out["modes"][mode] = {
            "seconds": med,
            "seconds_all": seconds[mode],
            "speedup": ref_s / med,
            "tasks": per_task,
            "agree": sum(p["agree"] * p["documents"] for p in per_task.values()) / n if n else 1.0,
        }
    return out


def format_eval_table(res: dict) -> str:
    """Seconds, speed-up and agreement per mode, then the per-task scores."""
    rows = [
        f"{res['model']} on {res['device']}, suite {res['suite']} ({len(res['tasks'])} tasks), "
        f"eval_limit {res['eval_limit']}, batch {res['batch_size']}, adapter {res['adapter']['source']}, "
        f"median of {res['repeats']} run(s) per mode; agree = share of documents answered as {res['reference']}",
        f"{'mode':<13}{'seconds':>9}{'speed-up':>10}{'agree':>8}",
    ]
    for name, m in res["modes"].items():
        rows.append(f"{name:<13}{m['seconds']:>9.2f}{m['speedup']:>9.2f}x{m['agree']:>8.3f}")
    rows += ["", f"{'task':<16}" + "".join(f"{name:>13}" for name in res["modes"])]
    for t in res["tasks"]:
        rows.append(f"{t:<16}" + "".join(f"{m['tasks'][t]['score']:>13.3f}" for m in res["modes"].values()))
    return "\n".join(rows)


# --- evaluation throughput: lm-eval vs a bare batched forward over the same requests ------------
def _requests(suite, tasks: list[str], limit: int | None):
    from lm_eval.tasks import get_task_dict  # lazy: lm-eval loads in ~0.6 s; config checks and --help need none of it

    cfgs = suite.lm_eval_task_configs()
    td = get_task_dict([cfgs[t] for t in tasks], task_manager())
    ll, gen = [], []
    for task in td.values():
        task.build_all_requests(limit=limit, rank=0, world_size=1)
        for inst in task.instances:
            (ll if inst.request_type == "loglikelihood" else gen).append(inst.args)
    return ll, gen


@torch.no_grad()
def _bare_loglikelihood(model, tok, reqs, batch_size: int) -> None:
    """An equally clever scorer: one forward per context when every choice is a single token."""
    dev = next(model.parameters()).device
    by_ctx: dict[str, list[list[int]]] = {}
    for ctx, cont in reqs:
        by_ctx.setdefault(ctx, []).append(tok(cont, add_special_tokens=False)["input_ids"])
    seqs = []  # (token ids, n_ctx, continuations scored from this forward)
    for ctx, conts in by_ctx.items():
        c = tok(ctx, add_special_tokens=False)["input_ids"]
        if all(len(x) == 1 for x in conts):
            seqs.append((c, len(c), conts))
        else:
            seqs.extend((c + x, len(c), [x]) for x in conts)
    seqs.sort(key=lambda s: -len(s[0]))  # like lm-eval: longest first, little padding
    pad = tok.pad_token_id or 0
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i : i + batch_size]
        L = max(len(s) for s, _, _ in chunk)
        ids = torch.full((len(chunk), L), pad, dtype=torch.long)
        for j, (s, _, _) in enumerate(chunk):
            ids[j, : len(s)] = torch.tensor(s)
        logits = model(input_ids=ids.to(dev)).logits
        for j, (s, n_ctx, conts) in enumerate(chunk):
            if len(s) == n_ctx:  # single-token choices: all read off the last context position
                lp = torch.log_softmax(logits[j, n_ctx - 1].float(), dim=-1)
                [lp[x[0]] for x in conts]
            else:
                lp = torch.log_softmax(logits[j, n_ctx - 1 : len(s) - 1].float(), dim=-1)
                lp.gather(-1, torch.tensor(s[n_ctx:], device=dev)[:, None]).sum()


@torch.no_grad()
def _bare_generate(model, tok, reqs, batch_size: int) -> None:
    dev = next(model.parameters()).device
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        reqs = sorted(reqs, key=lambda r: -len(r[0]))
        for i in range(0, len(reqs), batch_size):
            chunk = reqs[i : i + batch_size]
            enc = tok([c for c, _ in chunk], return_tensors="pt", padding=True, add_special_tokens=False).to(dev)
            max_new = int(chunk[0][1].get("max_gen_toks", 16))
            model.generate(**enc, max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id)
    finally:
        tok.padding_side = side


def run_eval_bench(
    model_name: str,
    suite_name: str,
    *,
    batch_size: int = 32,
    limit: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
) -> dict:
    """Time lm-eval (as the scheduler calls it) and a bare batched scorer on the same requests."""
    set_torch_threads()
    suite = load_suite(suite_name)
    model, tok = load_model(model_name, device=device, dtype=dtype)
    model.eval()
    tasks = suite.task_names
    ll, gen = _requests(suite, tasks, limit)
    ev = Evaluator(suite, tok, batch_size=batch_size, limit=limit)
    out = {
        "model": model_name,
        "suite": suite.name,
        "batch_size": batch_size,
        "requests": {"loglikelihood": len(ll), "generate_until": len(gen)},
    }
    # lm-eval, per request type (tasks split by kind so each side times the same work).
    by_kind = {
        "loglikelihood": [t for t in tasks if suite.task(t).kind == "multiple_choice"],
        "generate_until": [t for t in tasks if suite.task(t).kind != "multiple_choice"],
    }
    bare = {
        "loglikelihood": lambda: _bare_loglikelihood(model, tok, ll, batch_size),
        "generate_until": lambda: _bare_generate(model, tok, gen, batch_size),
    }
    for kind, ts in by_kind.items():
        if not ts:
            continue
        t0 = time.perf_counter()
        ev.evaluate(model, ts)
        t_lm = time.perf_counter() - t0
        t0 = time.perf_counter()
        bare[kind]()
        t_bare = time.perf_counter() - t0
        out[kind] = {"lm_eval_s": t_lm, "bare_s": t_bare, "lm_eval_throughput_vs_bare": t_bare / t_lm}
    return out
