"""Writing stock PEFT adapter folders (adapter_config.json + adapter_model.safetensors) from adapters.

One adapter is written as it is; several (one per task) as ONE adapter of the summed rank T·r whose ΔW is
exactly Σ_t s·B_t·A_t (A's stacked, B's side by side, lora_alpha T·alpha so the scaling stays alpha/r).
`harness export` and merging write their folders here.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from harness.adapters.sequence import AdapterSequence
from harness.errors import HarnessError

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
Adapter = dict[str, torch.Tensor]  # PEFT state dict of one adapter: <module>.lora_A.weight / .lora_B.weight


def write_adapters(folder: Path, adapters: list[Adapter], config: dict) -> None:
    """One adapter as it is; several as one adapter of the summed rank (exact ΔW = Σ s B_i A_i)."""
    if len(adapters) > 1:
        adapters, config = (
            [stack(adapters)],
            {**config, "r": config["r"] * len(adapters), "lora_alpha": config["lora_alpha"] * len(adapters)},
        )
    save_file({k: v.contiguous() for k, v in adapters[0].items()}, str(Path(folder) / WEIGHTS))
    (Path(folder) / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))


def stack(adapters: list[Adapter]) -> Adapter:
    """A's stacked along the rank (rows), B's side by side (columns): B_cat A_cat = Σ_i B_i A_i."""
    out = {}
    for k in adapters[0]:
        out[k] = torch.cat([a[k] for a in adapters], dim=0 if ".lora_A." in k else 1)
    return out


def write_peft_folder(seq, folder: Path) -> None:
    """A live AdapterSequence's adapters as one stock PEFT folder (what merging loads): saved as a stage saves
    them, then copied (one adapter) or stacked (several) as `harness export` does."""
    folder = Path(folder)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        seq.save(Path(tmp))
        export_dense(Path(tmp), folder)


def export_dense(stage_dir: Path, out: Path) -> None:
    """A stage folder of a dense method (or an older LoRI-S stage): its PEFT files, copied or stacked."""
    files, config = dense_stage(stage_dir)
    if len(files) == 1:
        for name in (CONFIG, WEIGHTS):
            shutil.copyfile(next(iter(files.values())).parent / name, out / name)
        return
    write_adapters(out, [load_file(str(f)) for f in files.values()], config)


def dense_stage(stage_dir: Path) -> tuple[dict[str, Path], dict]:
    """(adapter name -> its PEFT weights file, the first adapter's PEFT config) of a stage folder with adapter/."""
    info_path = stage_dir / "adapters.json"
    if not info_path.exists():
        raise HarnessError(
            f"{stage_dir}: neither LoRI-S stage files nor adapters.json; delete the stage folder to redo it."
        )
    files = {n: AdapterSequence.adapter_file(stage_dir, n) for n in json.loads(info_path.read_text())["adapters"]}
    missing = [str(f) for f in files.values() if not f.exists()]
    if missing:
        raise HarnessError(
            f"{missing[0]}: adapter file missing; the stage folder is incomplete. Delete it to redo the stage."
        )
    return files, json.loads((next(iter(files.values())).parent / CONFIG).read_text())
