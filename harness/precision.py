"""Numerics, decided once per run and recorded: the base weights' dtype, the adapters' dtype, TF32, CPU autocast.

The policy (README "Precision"): the frozen base model may be low precision (`dtype`), but everything that
trains or is trained (LoRA/LoRI A and B, LoRI-S's sparse values, their gradients and AdamW moments) is
fp32 unless `adapter_dtype: base` asks for the base's dtype (PEFT's `autocast_adapter_dtype=False`, kept for
experiments). The LoRA branch computes in the adapter's dtype and PEFT adds it to the base layer's output in
that dtype before rounding the sum to the base dtype.

TF32 (CUDA fp32 matmuls on 10-bit-mantissa inputs) is set explicitly for training (`tf32`, default off) and
forced off wherever answers must be exact: evaluation, folding adapters into the weights, the merge
protocol (`exact_matmuls`). On CPU it does not exist.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

ADAPTER_DTYPES = ("fp32", "base")


def autocast_dtype(device: torch.device, bf16_autocast: bool) -> torch.dtype | None:
    """bf16 on CPU when asked (CUDA runs in the model's own dtype); None: no autocast."""
    return torch.bfloat16 if bf16_autocast and device.type == "cpu" else None


def autocast_ctx(device: torch.device, bf16_autocast: bool):
    """The autocast_dtype as a context; a no-op where there is none."""
    dtype = autocast_dtype(device, bf16_autocast)
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def adapter_torch_dtype(adapter_dtype: str, base: torch.dtype) -> torch.dtype:
    """The dtype of every adapter tensor (A, B, LoRI-S values; so their gradients and AdamW moments)."""
    if adapter_dtype == "fp32":
        return torch.float32
    if adapter_dtype == "base":
        return base
    raise ValueError(f"unknown adapter_dtype {adapter_dtype!r}: use one of {', '.join(ADAPTER_DTYPES)}")


def set_tf32(enabled: bool) -> None:
    """TF32 for CUDA fp32 matmuls and convolutions, set explicitly (PyTorch's own default is off for matmuls)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


@contextlib.contextmanager
def exact_matmuls():
    """TF32 off inside (evaluation, folding, merging: answers must not depend on it); restored afterwards."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    set_tf32(False)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@dataclass(frozen=True)
class Precision:
    """What a run's numbers depend on besides config and seed; recorded in config.yaml, stage.json and MLflow."""

    device: str  # "cpu", "cuda", "cuda:1"
    base_dtype: torch.dtype
    adapter_dtype: torch.dtype
    tf32: bool  # training matmuls (CUDA only; always off for evaluation, folding and merging)
    bf16_autocast: bool  # CPU training under bf16 autocast

    def record(self) -> dict:
        """The precision block of config.yaml and stage.json (a resume under another one is refused)."""
        return {
            "device_type": torch.device(self.device).type,
            "base_dtype": dtype_name(self.base_dtype),
            "adapter_dtype": dtype_name(self.adapter_dtype),
            "optimizer_state_dtype": dtype_name(self.adapter_dtype),
            "tf32_train": self.tf32 and torch.device(self.device).type == "cuda",
            "tf32_eval": False,
            "cpu_bf16_autocast": self.bf16_autocast and torch.device(self.device).type == "cpu",
        }

    def describe(self) -> str:
        r = self.record()
        extra = ", TF32 in training" if r["tf32_train"] else ""
        extra += ", bf16 autocast" if r["cpu_bf16_autocast"] else ""
        return f"base {r['base_dtype']}, adapters and AdamW {r['adapter_dtype']}{extra}"


def check_dtype_on_device(dtype: torch.dtype, device: torch.device) -> str | None:
    """Why `dtype` cannot be the base dtype on `device` (None: it can)."""
    if dtype == torch.float16 and device.type == "cpu":
        return (
            "fp16 weights need a CUDA GPU (CPU fp16 matmuls are emulated and slow); use dtype fp32 or bf16 on CPU, "
            "or --device cuda"
        )
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return (
            f"bf16 is not supported by {torch.cuda.get_device_name(device)}; use dtype fp16 (with care: no loss "
            "scaling here) or fp32"
        )
    return None


def precision_of(cfg, model: torch.nn.Module) -> Precision:
    """The run's precision as it is: the loaded base model's device and dtype, the config's adapter, TF32 and autocast knobs."""
    p = next(p for p in model.parameters() if p.is_floating_point())
    return Precision(
        device=str(p.device),
        base_dtype=p.dtype,
        adapter_dtype=adapter_torch_dtype(cfg.adapter_dtype, p.dtype),
        tf32=cfg.tf32,
        bf16_autocast=cfg.bf16_autocast,
    )
