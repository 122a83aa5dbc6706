"""The files of a LoRI-S stage: what the stage trained (its mask and the values under it), never a dense B.

    masks.safetensors   per lora_B key (the key of that tensor in an exported PEFT adapter): the stage's
                        mask, bit-packed along the rank: uint8 of shape (d_out, ceil(r/8)), bit j (least
                        significant first) of byte c is column 8c+j. Metadata: format, rank.
    values.safetensors  per lora_B key: B's entries at the mask's positions, in row-major order (B's dtype).
    lori.json           the adapter these belong to, how A is made (init, seed, task) and the sha256 of A,
                        so A is regenerated from its seed and verified instead of stored at every stage.

The stage's B is rebuilt by replaying stages 1..t: B.flat[mask positions] = values (harness/run/export.py
and LoRIS.restore). Folders written before this layout (a dense `adapter/` and masks.safetensors as
uint8 of B's shape) are still read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from harness.errors import HarnessError

MASKS = "masks.safetensors"
VALUES = "values.safetensors"
META = "lori.json"
MASK_FORMAT = "packbits-rank-lsb"

_BITS = 1 << torch.arange(8, dtype=torch.int32)  # 1, 2, 4, ..., 128: bit j of a byte is column 8c + j


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """(d_out, r) bool -> (d_out, ceil(r/8)) uint8, least significant bit first."""
    d_out, r = mask.shape
    padded = torch.zeros(d_out, -(-r // 8) * 8, dtype=torch.int32)
    padded[:, :r] = mask.cpu().to(torch.int32)
    return (padded.view(d_out, -1, 8) * _BITS).sum(-1).to(torch.uint8)


def unpack_mask(packed: torch.Tensor, rank: int) -> torch.Tensor:
    """Inverse of pack_mask: (d_out, ceil(r/8)) uint8 -> (d_out, r) bool."""
    bits = (packed.to(torch.int32).unsqueeze(-1) & _BITS) != 0
    return bits.reshape(packed.shape[0], -1)[:, :rank]


def save_masks(folder: Path, masks: Mapping[str, torch.Tensor]) -> None:
    """A stage's masks (bool, B's shape) as masks.safetensors, bit-packed, keyed like the lora_B weights."""
    ranks = {m.shape[1] for m in masks.values()}
    if len(ranks) != 1:
        raise ValueError(f"masks of one adapter share its rank, got {sorted(ranks)}")
    save_file(
        {k: pack_mask(v) for k, v in masks.items()},
        str(Path(folder) / MASKS),
        metadata={"format": MASK_FORMAT, "rank": str(ranks.pop())},
    )


def load_masks(folder: Path) -> dict[str, torch.Tensor] | None:
    """masks.safetensors as bool tensors of B's shape; None when the folder has none."""
    p = Path(folder) / MASKS
    if not p.exists():
        return None
    with safe_open(str(p), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") == MASK_FORMAT:
        return {k: unpack_mask(v, int(meta["rank"])) for k, v in tensors.items()}
    if meta.get("format") is None:  # the older layout: uint8 of B's shape
        return {k: v.bool() for k, v in tensors.items()}
    raise HarnessError(f"{p}: unknown mask format {meta.get('format')!r} (written by a newer harness?)")


def save_stage(folder: Path, masks: Mapping[str, torch.Tensor], values: Mapping[str, torch.Tensor], meta: dict) -> None:
    """Write the three files of a LoRI-S stage (see the module docstring)."""
    folder = Path(folder)
    save_masks(folder, masks)
    save_file({k: v.detach().contiguous().cpu() for k, v in values.items()}, str(folder / VALUES))
    (folder / META).write_text(json.dumps(meta, indent=1))


def is_sparse_stage(folder: Path) -> bool:
    return (Path(folder) / VALUES).exists()


def read_stage(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """(masks, values, meta) of a stage written by save_stage; a clear error when a file is missing or inconsistent."""
    folder = Path(folder)
    missing = [n for n in (MASKS, VALUES, META) if not (folder / n).exists()]
    if missing:
        raise HarnessError(
            f"{folder}: LoRI-S stage files missing ({', '.join(missing)}); delete the stage folder to redo the stage."
        )
    masks, values = load_masks(folder), load_file(str(folder / VALUES))
    meta = json.loads((folder / META).read_text())
    bad = sorted(set(masks) ^ set(values)) + [
        k for k in masks if k in values and int(masks[k].sum()) != values[k].numel()
    ]
    if bad:
        raise HarnessError(
            f"{folder}: {MASKS} and {VALUES} do not match (keys or counts differ: {bad[:3]}); "
            "delete the stage folder to redo the stage."
        )
    return masks, values, meta


@torch.no_grad()
def apply_values(B: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> None:
    """Write a stage's values into B (in place) at its mask's flat positions (sparse.mask_index): replaying stages
    1..t rebuilds B_t."""
    B.view(-1)[index.to(B.device, torch.long)] = values.to(B.device, B.dtype)
