"""A stage's peak memory, estimated from the model's config before anything is loaded, and the preflight on it.

    weights      every parameter of the base model at the base dtype (meta device count, exact)
    adapter      the adapter of one task at fp32, with its gradient and AdamW's two moments: 16 bytes a parameter
    activations  what backward keeps per token and layer of a Llama-style decoder with fused attention (no s² term):
                 norm inputs and outputs, q, k, v, attention output (8h + 2·kv) and the MLP's gate, up, act(gate) and
                 product (4·i), at the base dtype; with gradient checkpointing, each layer's input (h) plus one
                 layer's full set, recomputed during backward
    logits       batch × seq × vocab entries at 16 bytes (the logits, their fp32 copy in the loss, its softmax and
                 the gradient)
    evaluation   folded evaluation (eval_merged) builds fp32 copies of every adapted layer: 4 bytes a parameter of
                 those layers, which for a bf16 base is twice their size
    runtime      CUDA context and allocator slack: 1 GiB on CUDA, 0 on CPU

    peak = weights + adapter + max(activations + logits, evaluation) + runtime

It is a planning number, meant to err high: tests/test_memory.py compares it with what backward keeps. AUTO_BF16_ABOVE
(harness/models/environment.py) is the size above which `dtype: auto` loads the base in bf16 (docs/precision.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from harness.errors import HarnessError
from harness.models.shapes import model_config

GiB = 1024**3
ADAPTER_BYTES = 16  # fp32 weight + fp32 gradient + AdamW exp_avg + exp_avg_sq
LOGIT_BYTES = 16
CUDA_RUNTIME = 1 * GiB


@dataclass(frozen=True)
class Shape:
    """What the estimate needs of a model: read from its config (shape_of) or given by hand."""

    params: int
    layers: int
    hidden: int
    kv_dim: int
    intermediate: int
    vocab: int


@dataclass(frozen=True)
class Estimate:
    weights: int
    adapter: int
    activations: int
    logits: int
    evaluation: int
    runtime: int

    @property
    def total(self) -> int:
        return self.weights + self.adapter + max(self.activations + self.logits, self.evaluation) + self.runtime

    def describe(self) -> str:
        parts = {
            "weights": self.weights,
            "adapter and AdamW": self.adapter,
            "activations": self.activations,
            "logits": self.logits,
            "folded evaluation": self.evaluation,
            "runtime": self.runtime,
        }
        return f"{gib(self.total)} (" + ", ".join(f"{k} {gib(v)}" for k, v in parts.items() if v) + ")"


def gib(n: int | float) -> str:
    return f"{n / GiB:.1f} GiB"


def shape_of(config) -> Shape:
    """A transformers config's shape; the parameter count is exact (the model built on the meta device)."""
    from transformers import AutoModelForCausalLM  # lazy: transformers' models load in ~0.7 s; --help needs none

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return Shape(
        params=sum(p.numel() for p in model.parameters()),
        layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        kv_dim=(getattr(config, "num_key_value_heads", None) or heads) * head_dim,
        intermediate=config.intermediate_size,
        vocab=config.vocab_size,
    )


def model_params(name: str, **kw) -> int | None:
    """The model's parameter count from its config (meta device, no weights); None where the config is unreadable."""
    config = model_config(name, **kw)
    return shape_of(config).params if config is not None else None


def estimate(
    shape: Shape,
    *,
    dtype: torch.dtype,
    adapter_params: int,
    adapted_params: int,
    batch_size: int,
    seq_len: int,
    checkpointing: bool,
    folded_eval: bool,
    cuda: bool,
) -> Estimate:
    """The peak of one training stage (see the module docstring); adapted_params: the weights of the adapted layers."""
    a = torch.finfo(dtype).bits // 8
    tokens = batch_size * seq_len
    per_layer = 8 * shape.hidden + 2 * shape.kv_dim + 4 * shape.intermediate
    kept = shape.layers * shape.hidden + per_layer if checkpointing else shape.layers * per_layer
    return Estimate(
        weights=shape.params * a,
        adapter=adapter_params * ADAPTER_BYTES,
        activations=tokens * kept * a,
        logits=tokens * shape.vocab * LOGIT_BYTES,
        evaluation=adapted_params * 4 if folded_eval else 0,
        runtime=CUDA_RUNTIME if cuda else 0,
    )


def free_memory(device: torch.device) -> int | None:
    """Bytes free on the device now: CUDA's free memory, or the CPU's MemAvailable; None where unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def peak_memory(device: torch.device) -> dict[str, Any]:
    """This process's peak memory so far: CUDA's peak reserved bytes on the device, else the peak resident set (RSS)."""
    if device.type == "cuda":
        return {"device": "cuda", "bytes": int(torch.cuda.max_memory_reserved(device)), "what": "torch peak reserved"}
    import resource  # lazy: POSIX only (absent on Windows); the rest of this module works everywhere

    return {
        "device": device.type,
        "bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024,
        "what": "peak RSS",
    }


def what_would_fit(
    est_for, free: int, dtype: torch.dtype, checkpointing: bool, folded_eval: bool, batch_size: int
) -> list[str]:
    """The changes (flags) and their estimates: each alone, then all together, then a smaller batch if one fits."""
    options = []
    if dtype == torch.float32:
        options.append(("--dtype bf16", {"dtype": torch.bfloat16}))
    if not checkpointing:
        options.append(("--gradient-checkpointing true", {"checkpointing": True}))
    if folded_eval:
        options.append(
            ("--eval-merged false (evaluate through PEFT: no fp32 copies of the folded layers)", {"folded_eval": False})
        )
    out = [f"{flag}: {gib(est_for(**change).total)}" for flag, change in options]
    if len(options) > 1:
        together = {k: v for _, change in options for k, v in change.items()}
        out.append(f"all of these: {gib(est_for(**together).total)}")
    for b in (batch_size // 2, batch_size // 4, 1):
        if 0 < b < batch_size and est_for(batch_size=b).total <= free:
            out.append(
                f"--batch-size {b}: {gib(est_for(batch_size=b).total)} (a smaller batch changes the recipe; "
                f"there is no gradient accumulation knob yet)"
            )
            break
    return out


def adapter_sizes(shapes: dict[str, tuple[int, int]], targets: list[str], rank: int) -> tuple[int, int]:
    """(one task's adapter parameters r·(d_in + d_out), the adapted layers' own parameters) over the target modules."""
    hit = [(o, i) for name, (o, i) in shapes.items() if name.rsplit(".", 1)[-1] in targets]
    return sum(rank * (o + i) for o, i in hit), sum(o * i for o, i in hit)


def preflight(
    shape: Shape,
    *,
    dtype: torch.dtype,
    adapter_params: int,
    adapted_params: int,
    batch_size: int,
    seq_len: int,
    checkpointing: bool,
    folded_eval: bool,
    device: torch.device,
    free: int | None,
) -> Estimate:
    """The stage's estimate; HarnessError (exit 2) naming what would fit when it exceeds the free memory."""

    def est_for(**change) -> Estimate:
        kw = {
            "dtype": dtype,
            "checkpointing": checkpointing,
            "batch_size": batch_size,
            "folded_eval": folded_eval,
        } | change
        return estimate(
            shape,
            adapter_params=adapter_params,
            adapted_params=adapted_params,
            seq_len=seq_len,
            cuda=device.type == "cuda",
            **kw,
        )

    est = est_for()
    if free is not None and est.total > free:
        fits = what_would_fit(est_for, free, dtype, checkpointing, folded_eval, batch_size)
        raise HarnessError(
            f"memory: a training stage of this model (batch {batch_size} x {seq_len} tokens, the longest the suite's budget "
            f"allows or 512 without a max_seq_len) needs about {est.describe()} on {device}, and {gib(free)} is free. "
            f"What would change it: {'; '.join(fits) or 'nothing the harness can set: use a larger device'}. "
            f"(Estimate: harness/models/memory.py; docs/precision.md.)"
        )
    return est
