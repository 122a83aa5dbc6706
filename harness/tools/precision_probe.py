"""`python -m harness.tools.precision_probe`: how much of an adapter's gradient and output a bf16 base model loses.

The experiment behind README "Precision". One stage of a method trains on a suite task in fp32 (so the
adapter is non-zero); then, for the same adapter and the same batches of the NEXT task, it compares
  - the gradient of the trainable tensors (LoRI-S: the sparse values) with the base in fp32 and in bf16
    (the adapters stay fp32 either way): cosine similarity and relative error of the whole gradient;
  - the adapter's contribution to the layer outputs: PEFT adds the fp32 LoRA branch to the bf16 base output
    and rounds the sum to bf16; the fraction of the branch's norm that the rounding changes.
A cosine far below 1 means that under a bf16 base AdamW (which normalises each coordinate) follows rounding
noise, whatever precision the adapter state is kept in.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from harness.config import ExperimentConfig
from harness.methods import METHODS, StageContext
from harness.models import load_model
from harness.run.batches import collate, tokenize_examples
from harness.run.recipe import Recipe
from harness.run.train import forward_loss, train_stage
from harness.suites import load_suite


def _grads(method, batches) -> torch.Tensor:
    params = list(method.trainable().values())
    for p in params:
        p.grad = None
    for b in batches:
        forward_loss(method.model, b["input_ids"], b["attention_mask"], b["labels"], "token").backward()
    return torch.cat([p.grad.detach().float().reshape(-1) for p in params])


def _branch_rounding(method, batch) -> float:
    """Fraction of the LoRA branches' output norm changed by adding them to a bf16 base output (over all layers)."""
    num = den = 0.0

    def hook(mod, args, out):
        nonlocal num, den
        x = args[0]
        base = mod.base_layer(x)
        branch = sum(
            mod.lora_B[a](mod.lora_A[a](x.to(mod.lora_A[a].weight.dtype))) * mod.scaling[a] for a in mod.active_adapters
        )
        got = (base + branch).to(base.dtype).float() - base.float()
        num += float((got - branch.float()).norm() ** 2)
        den += float(branch.float().norm() ** 2)

    handles = [layer.register_forward_hook(hook) for _, layer in method.adapters.layers()]
    with torch.no_grad():
        method.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for h in handles:
        h.remove()
    return (num / den) ** 0.5 if den else float("nan")


def probe(
    model_name: str,
    suite_name: str,
    method_name: str,
    tasks: tuple[str, str],
    *,
    steps: int,
    device: str,
    batches: int = 4,
) -> dict:
    suite = load_suite(suite_name)
    model, tok = load_model(model_name, device=device, dtype="fp32")
    cfg = ExperimentConfig(model=model_name, suite=suite_name, methods=[method_name], device=device)
    method = METHODS[method_name](cfg, seed=0, tasks=list(tasks), base_model=model)
    lr = cfg.lr_for(method_name, suite.task(tasks[0]).budget_for(suite).lr)
    for t, task in enumerate(tasks, 1):  # stage 1 trains; stage 2 only opens (its mask, for LoRI-S), nothing trains
        method.begin_stage(StageContext(stage=t, task=task, run_dir=Path("."), calibrate=lambda *a: None))
        if t == 1:
            examples = [{**ex, "eos": True} for ex in suite.task(task).train_examples()]
            train_stage(
                method.model,
                tok,
                examples,
                method.trainable(),
                recipe=Recipe.from_config(cfg),
                lr=lr,
                epochs=1,
                batch_size=8,
                steps=steps,
                max_seq_len=64,
                seed=0,
                stage=1,
                hooks=method,
                progress=False,
            )
            method.end_stage()
    dev = next(method.model.parameters()).device
    data = tokenize_examples(tok, suite.task(tasks[1]).train_examples()[: 8 * batches], 64)
    bs = [collate(data[i : i + 8], tok.pad_token_id or 0, dev) for i in range(0, len(data), 8)]
    g32 = _grads(method, bs)
    base = [p for n, p in method.model.named_parameters() if "lora_" not in n]
    for p in base:
        p.data = p.data.to(torch.bfloat16)
    g16, rounding = _grads(method, bs), _branch_rounding(method, bs[0])
    cos = float(torch.nn.functional.cosine_similarity(g32, g16, dim=0))
    return {
        "model": model_name,
        "suite": suite_name,
        "method": method_name,
        "trained": tasks[0],
        "probed": tasks[1],
        "stage1_steps": steps,
        "grad_cosine_bf16_vs_fp32": cos,
        "grad_rel_error": float((g16 - g32).norm() / g32.norm()),
        "branch_output_rounding": rounding,
        "trainable_elements": int(g32.numel()),
    }


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m harness.tools.precision_probe", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--suite", default="default")
    p.add_argument("--methods", default="lori-s,lora")
    p.add_argument("--tasks", default="dates,tickets", help="The task trained, then the task whose gradient is probed.")
    p.add_argument("--steps", type=int, default=76)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="Write the results here too.")
    a = p.parse_args()
    out = [
        probe(a.model, a.suite, m, tuple(a.tasks.split(",")), steps=a.steps, device=a.device)
        for m in a.methods.split(",")
    ]
    for r in out:
        print(json.dumps(r))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
