"""LoRI-S stages as dense adapters: B rebuilt by replaying the sparse stage files 1..t, A regenerated from its seed.

LoRI-S stage folders hold only masks and values (stage_files.py). A is regenerated on the model's module shapes
(read from the model's config, no weights loaded) and checked against the sha256 stored with the stage.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from harness.adapters.keys import a_key
from harness.adapters.peft_folder import Adapter, dense_stage
from harness.adapters.sequence import init_A, lora_config
from harness.errors import HarnessError
from harness.methods.lori import stage_files as SF
from harness.methods.lori.sparse import mask_index
from harness.models import linear_shapes, model_config
from harness.seeding import tensors_digest


def lori_s_adapters(run_cfg: dict, folders: list[Path]) -> tuple[list[Adapter], dict]:
    """Dense (A, B) per adapter after replaying LoRI-S stages `folders` (1..t, in order), A regenerated and verified."""
    B: dict[str, dict[str, torch.Tensor]] = {}
    A: dict[str, dict[str, torch.Tensor]] = {}
    meta: dict = {}
    d_in: dict[str, int] | None = None
    for folder in folders:
        if not SF.is_sparse_stage(folder):  # an older harness's dense stage: it holds all of A and B so far
            for name, f in dense_stage(folder)[0].items():
                sd = load_file(str(f))
                A[name] = {k: v for k, v in sd.items() if ".lora_A." in k}
                B[name] = {k: v for k, v in sd.items() if ".lora_B." in k}
            continue
        masks, values, meta = SF.read_stage(folder)
        name, dtype = meta["adapter"], getattr(torch, meta["dtype"])
        if name not in B:
            d_in = d_in or module_d_in(run_cfg, list(masks))
            B[name] = {k: torch.zeros(m.shape, dtype=dtype) for k, m in masks.items()}
            A[name] = regenerate_A(meta, d_in, dtype, folder)
        for k in masks:
            SF.apply_values(B[name][k], mask_index(masks[k]), values[k])
    return [{**{a_key(k): A[n][a_key(k)] for k in B[n]}, **B[n]} for n in B], meta


def regenerate_A(meta: dict, d_in: dict[str, int], dtype: torch.dtype, folder: Path) -> dict[str, torch.Tensor]:
    """A LoRI-S stage's A, regenerated from the seed in its lori.json and checked against the sha256 stored there."""
    suffix = ".lora_B.weight"
    A = {
        a_key(k): init_A(
            (meta["rank"], d), init=meta["a_init"], seed=meta["seed"], task=meta["a_task"], key=k[: -len(suffix)]
        ).to(dtype)
        for k, d in d_in.items()
    }
    if tensors_digest(A) != meta.get("a_sha256"):
        raise HarnessError(
            f"{folder}/{SF.META}: A regenerated from seed {meta['seed']} does not match the stored sha256 "
            "(another torch version, or another model than the run's?). Export with the environment that wrote it."
        )
    return A


def module_d_in(run_cfg: dict, b_keys: list[str]) -> dict[str, int]:
    """d_in of every adapted module, from the model's config on the meta device (no weights)."""
    model = run_cfg.get("model")
    config = model_config(
        model, cache_dir=run_cfg.get("cache_dir"), trust_remote_code=bool(run_cfg.get("trust_remote_code"))
    )
    if config is None:
        raise HarnessError(
            f"cannot read the config of model {model!r} here: export needs its module shapes to regenerate A "
            "(no weights). Make the model available as for `harness run`, then export again."
        )
    linear = linear_shapes(config)
    prefix, suffix = "base_model.model.", ".lora_B.weight"
    out = {}
    for k in b_keys:
        name = k[: -len(suffix)].removeprefix(prefix)
        if name not in linear:
            raise HarnessError(
                f"module {name} of the stage files is not a Linear of model {model!r}; was the run made with another model?"
            )
        out[k] = linear[name][1]
    return out


def lori_s_config(meta: dict, model: str | None) -> dict:
    cfg = lora_config(
        meta["rank"], meta["alpha"], meta["targets"], base_model_name_or_path=model, inference_mode=True
    ).to_dict()
    return json.loads(json.dumps(cfg, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))
