"""`harness bench`: median training-step time and tokens/s per method on the same batch.

Methods: lora, lori-d, lori-s (mask enforced exactly as in training) and `base`, a bare
forward+backward through the frozen base model (input embeddings require grad, so the backward
pass runs through every layer but computes no weight gradient): the floor every adapter pays.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from harness.adapters import masks as M
from harness.adapters.lori import AdapterSequence, MaskEnforcer, stable_seed
from harness.config import DEFAULT_TARGETS
from harness.io import atomic_write_json
from harness.train import autocast_ctx

METHODS = ("base", "lora", "lori-d", "lori-s")


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


def run_bench(
    model_name: str = "tiny-llama",
    *,
    methods: tuple[str, ...] = METHODS,
    rank: int = 8,
    targets: list[str] | None = None,
    batch_size: int = 8,
    seq_len: int = 128,
    steps: int = 10,
    warmup: int = 2,
    density: float = 0.1,
    device: str = "auto",
    dtype: str = "auto",
    bf16_autocast: bool = False,
) -> dict:
    """Measure every method on one batch; returns {"model", "methods": {name: {step_s_median, train_tok_s}}, ...}."""
    from harness.models import load_model, set_torch_threads

    set_torch_threads()
    targets = targets or list(DEFAULT_TARGETS)
    model, tok = load_model(model_name, device=device, dtype=dtype)
    dev = next(model.parameters()).device
    batch = _batch(len(tok), batch_size, seq_len, dev)
    n_tokens = batch_size * seq_len
    out: dict = {"model": model_name, "device": str(dev), "batch_size": batch_size, "seq_len": seq_len, "rank": rank,
                 "targets": targets, "steps": steps, "methods": {}}
    for method in methods:
        if method == "base":
            for p in model.parameters():
                p.requires_grad_(False)
            model.enable_input_require_grads()

            def step():
                with autocast_ctx(dev, bf16_autocast):
                    loss = model(**batch).loss
                loss.backward()

            model.train()
            times = _time_steps(step, warmup, steps, "base")
            model.disable_input_require_grads()
        else:
            seq = AdapterSequence(model, method=method, rank=rank, alpha=2 * rank, targets=targets, seed=0)
            name = seq.begin_task(1)
            params = seq.trainable_parameters()
            enforcer = None
            if method == "lori-s":
                shapes = {k: tuple(p.shape) for k, p in seq.b_params(name).items()}
                masks = M.allocate(M.random_scores(shapes, stable_seed(0, "bench")), None, density=density,
                                   policy="independent", scope="module")
                enforcer = MaskEnforcer(seq.b_params(name), masks)
            opt = torch.optim.AdamW(params, lr=1e-4)
            seq.model.train()

            def step():
                with autocast_ctx(dev, bf16_autocast):
                    loss = seq.model(**batch).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if enforcer is not None:
                    enforcer.after_step()

            times = _time_steps(step, warmup, steps, method)
            if enforcer is not None:
                enforcer.remove()
            model = seq.unload()
        med = statistics.median(times)
        out["methods"][method] = {"step_s_median": med, "train_tok_s": n_tokens / med,
                                  "step_s_min": min(times), "step_s_max": max(times)}
    return out


def format_table(res: dict) -> str:
    rows = [f"model {res['model']} on {res['device']}, batch {res['batch_size']}x{res['seq_len']}, rank {res['rank']}, "
            f"{len(res['targets'])} target modules, median of {res['steps']} steps",
            f"{'method':<8}{'step s (median)':>17}{'tokens/s':>11}{'vs lora':>9}"]
    lora = res["methods"].get("lora", {}).get("step_s_median")
    for name, m in res["methods"].items():
        rel = f"{m['step_s_median'] / lora:>8.2f}x" if lora else ""
        rows.append(f"{name:<8}{m['step_s_median']:>17.4f}{m['train_tok_s']:>11.0f}{rel:>9}")
    return "\n".join(rows)


def write_json(res: dict, path: Path) -> None:
    atomic_write_json(Path(path), res)
