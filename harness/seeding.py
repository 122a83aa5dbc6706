"""Seeds derived from names, and digests of tensors: stable across processes, machines and Python versions (unlike hash())."""

from __future__ import annotations

import hashlib
from typing import Any, Mapping

import torch


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from any parts; the same parts give the same seed everywhere."""
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def tensors_digest(tensors: Mapping[str, Any]) -> str:
    """sha256 over names, dtypes, shapes and exact bytes of named tensors, in name order (so order-independent).

    LoRI-S stores it for its regenerated A (lori.json a_sha256); ranks compare it to hold the same masks and weights."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
