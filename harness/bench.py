"""`harness bench`: median training-step time and tokens/s per method on the same batch.

Methods: any of harness/methods (timed through the same train_step as training, with the method's
hooks; LoRI-S's mask is part of its forward pass) and `base`, a bare forward+backward through the frozen base model (input
embeddings require grad, so the backward pass runs through every layer but computes no weight
gradient): the floor every adapter pays.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from harness.io import atomic_write_json
from harness.methods import METHODS, StageContext
from harness.precision import autocast_ctx
from harness.train import Recipe, make_optimizer, train_step

DEFAULT_METHODS = ("base", "lora", "lori-d", "lori-s")


def _batch(vocab: int, batch_size: int, seq_len: int, device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch_size, seq_len), generator=g)
    return {"input_ids": ids.to(device), "labels": ids.clone().to(device), "attention_mask": torch.ones_like(ids).to(device)}


def _time_steps(step, warmup: int, steps: int, desc: str) -> list[float]:
    times = []
    for i in tqdm(range(warmup + steps), desc=desc, leave=False):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def _base_step(model, batch, bf16_autocast: bool):
    """Forward + backward through the frozen model (input embeddings require grad): the floor every adapter pays."""
    for p in model.parameters():
        p.requires_grad_(False)
    model.enable_input_require_grads()
    model.train()

    def step():
        with autocast_ctx(batch["input_ids"].device, bf16_autocast):
            loss = model(**batch).loss
        loss.backward()

    return step


def _nbytes(tensors) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors))


def adapter_memory(method, opt, batch, recipe, bf16_autocast: bool) -> dict[str, int]:
    """Bytes held for training the adapter, measured from the tensors themselves (not from formulas).

    params: every adapter parameter (A and B of every adapter, frozen or not, and LoRI-S's trainable
    values vectors); grads: the gradients a step leaves on the trainable tensors; optimizer: AdamW's
    state tensors; snapshot: whatever the method keeps besides (Method.held_tensors; LoRI-S: the
    mask positions, no copy of B; it lists each tensor once)."""
    from harness.train import lm_loss

    model = method.model
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    trainable = list(method.trainable().values())
    with autocast_ctx(batch["input_ids"].device, bf16_autocast):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    lm_loss(logits, batch["labels"], recipe.loss_reduction).backward()
    grads = [p.grad for p in trainable if p.grad is not None]
    out = {"params_bytes": _nbytes(params), "grads_bytes": _nbytes(grads),
           "optimizer_bytes": _nbytes(v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)),
           "snapshot_bytes": _nbytes(method.held_tensors())}
    out["total_bytes"] = sum(out.values())
    for p in trainable:
        p.grad = None
    return out


def run_bench(cfg, *, methods: tuple[str, ...] = DEFAULT_METHODS, batch_size: int = 8, seq_len: int = 128,
              steps: int = 10, warmup: int = 2, memory: bool = False) -> dict:
    """Time the real training step (harness.train.train_step, with the method's hooks) of every method on one batch.

    Rank, alpha, targets, mask density, recipe, device and dtype come from the experiment config `cfg`.
    With memory=True, also {"memory": {METHOD: {params_bytes, grads_bytes, optimizer_bytes, snapshot_bytes,
    total_bytes}}}, measured after the timed steps (so AdamW's state exists)."""
    from harness.models import load_model, set_torch_threads

    set_torch_threads()
    if cfg.mask_strategy != "random":  # a magnitude mask needs a calibration run; the step itself is the same
        cfg = cfg.model_copy(update={"mask_strategy": "random"})
    model, tok = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, cache_dir=cfg.cache_dir, trust_remote_code=cfg.trust_remote_code)
    dev = next(model.parameters()).device
    batch = _batch(len(tok), batch_size, seq_len, dev)
    recipe = Recipe.from_config(cfg)
    out: dict = {"model": cfg.model, "device": str(dev), "batch_size": batch_size, "seq_len": seq_len, "rank": cfg.rank,
                 "targets": cfg.targets, "steps": steps, "methods": {}}
    for name in methods:
        if name == "base":
            times = _time_steps(_base_step(model, batch, cfg.bf16_autocast), warmup, steps, "base")
            model.disable_input_require_grads()
        else:
            method = METHODS[name](cfg, seed=0, tasks=["bench"], base_model=model)
            method.begin_stage(StageContext(stage=1, task="bench", run_dir=Path("."), calibrate=lambda *a: None,
                                            batches=lambda idx, bs: iter([batch]), n_examples=batch_size))  # inflora, ewc
            params = list(method.trainable().values())
            opt, sched = make_optimizer(params, cfg.lr_for(name), recipe, warmup + steps)
            method.model.train()
            times = _time_steps(lambda: train_step(method.model, batch, params, opt, sched, recipe, method, cfg.bf16_autocast),
                                warmup, steps, name)
            if memory:
                out.setdefault("memory", {})[name] = adapter_memory(method, opt, batch, recipe, cfg.bf16_autocast)
            method.end_stage()
            model = method.unload()
        med = statistics.median(times)
        out["methods"][name] = {"step_s_median": med, "train_tok_s": batch_size * seq_len / med,
                                "step_s_min": min(times), "step_s_max": max(times)}
    return out


def format_table(res: dict) -> str:
    """Step times (and, with --memory, adapter training memory in MB) as a plain-text table."""
    rows = [f"model {res['model']} on {res['device']}, batch {res['batch_size']}x{res['seq_len']}, rank {res['rank']}, "
            f"{len(res['targets'])} target modules, median of {res['steps']} steps",
            f"{'method':<8}{'step s (median)':>17}{'tokens/s':>11}{'vs lora':>9}"]
    lora = res["methods"].get("lora", {}).get("step_s_median")
    for name, m in res["methods"].items():
        rel = f"{m['step_s_median'] / lora:>8.2f}x" if lora else ""
        rows.append(f"{name:<8}{m['step_s_median']:>17.4f}{m['train_tok_s']:>11.0f}{rel:>9}")
    if res.get("memory"):
        mb = lambda b: f"{b / 2**20:>10.2f}"  # noqa: E731
        rows += ["", "adapter training memory, MB (measured from the tensors)",
                 f"{'method':<8}{'params':>10}{'grads':>10}{'optimizer':>10}{'snapshot':>10}{'total':>10}"]
        for name, m in res["memory"].items():
            rows.append(f"{name:<8}{mb(m['params_bytes'])}{mb(m['grads_bytes'])}{mb(m['optimizer_bytes'])}"
                        f"{mb(m['snapshot_bytes'])}{mb(m['total_bytes'])}")
    return "\n".join(rows)


def write_json(res: dict, path: Path) -> None:
    atomic_write_json(Path(path), res)


# --- evaluation throughput: lm-eval vs a bare batched forward over the same requests ------------
def _requests(suite, tasks: list[str], limit: int | None):
    from lm_eval.tasks import TaskManager, get_task_dict

    cfgs = suite.lm_eval_task_configs()
    td = get_task_dict([cfgs[t] for t in tasks], TaskManager(include_defaults=False))
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


def run_eval_bench(model_name: str, suite_name: str, *, batch_size: int = 32, limit: int | None = None,
                   device: str = "auto", dtype: str = "auto") -> dict:
    """Time lm-eval (as the scheduler calls it) and a bare batched scorer on the same requests."""
    from harness.evaluate import Evaluator
    from harness.models import load_model, set_torch_threads
    from harness.suites import load_suite

    set_torch_threads()
    suite = load_suite(suite_name)
    model, tok = load_model(model_name, device=device, dtype=dtype)
    model.eval()
    tasks = suite.task_names
    ll, gen = _requests(suite, tasks, limit)
    ev = Evaluator(suite, tok, batch_size=batch_size, limit=limit)
    out = {"model": model_name, "suite": suite.name, "batch_size": batch_size, "requests": {"loglikelihood": len(ll), "generate_until": len(gen)}}
    # lm-eval, per request type (tasks split by kind so each side times the same work).
    by_kind = {"loglikelihood": [t for t in tasks if suite.task(t).kind == "multiple_choice"],
               "generate_until": [t for t in tasks if suite.task(t).kind != "multiple_choice"]}
    bare = {"loglikelihood": lambda: _bare_loglikelihood(model, tok, ll, batch_size),
            "generate_until": lambda: _bare_generate(model, tok, gen, batch_size)}
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
