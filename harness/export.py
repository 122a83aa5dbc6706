"""`harness export RUN_DIR [--stage t] OUT`: a stock PEFT adapter folder of a sequence at one of its stages.

OUT holds adapter_config.json + adapter_model.safetensors; PeftModel.from_pretrained(base_model, OUT)
gives the harness's model at that stage. Where the stage has one adapter (lora, replay, mtl, lori-d
and lori-s with a_mode shared) the tensors are the harness's own, so the logits are bit-identical.
Methods with one adapter per task (inclora, olora, a_mode per_task) are exported as the exact sum
Σ_t s·B_t·A_t in ONE adapter of rank T·r (A's stacked, B's side by side, lora_alpha T·alpha so the
scaling stays alpha/r): the same ΔW, logits equal up to float summation order (PEFT adds the
adapters one by one; the stacked matmul sums over all T·r ranks at once).

Dense methods' stage folders already hold PEFT files (copied, or stacked). LoRI-S stage folders
hold only masks and values (harness/adapters/stage_files.py): B is rebuilt by replaying stages
1..t, and A is regenerated from its seed on the model's module shapes (read from the model's
config, no weights loaded) and checked against the sha256 stored with the stage.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from harness.adapters import stage_files as SF
from harness.adapters.sparse import mask_index
from harness.errors import HarnessError
from harness.io import atomic_dir
from harness.seeding import tensors_digest
from harness import sequence_files

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
Adapter = dict[str, torch.Tensor]  # PEFT state dict of one adapter: <module>.lora_A.weight / .lora_B.weight


def committed_stages(run_dir: Path) -> dict[int, Path]:
    """Training stages (t >= 1) whose commit marker exists (read only: unlike a resume, nothing is cleaned up)."""
    return {t: p for t, p in sequence_files.committed_stages(run_dir).items() if t > 0}


def export_adapter(run_dir: Path, out: Path, stage: int | None = None) -> Path:
    """Write the PEFT adapter of sequence folder `run_dir` at committed stage `stage` (default: the last) to `out`."""
    run_dir, out = Path(run_dir), Path(out)
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "stages").is_dir():
        raise HarnessError(f"{run_dir}: not a sequence folder (it has no config.yaml and stages/). Pass the folder of one "
                           "sequence: results/<experiment>/<method>/seed-<s>[/order-<k>].")
    done = committed_stages(run_dir)
    if not done:
        raise HarnessError(f"{run_dir}: no training stage is committed yet; run or resume the sequence first.")
    t = max(done) if stage is None else stage
    if t not in done:
        raise HarnessError(f"--stage {t}: stage {t} is not committed in {run_dir} (committed: {', '.join(map(str, sorted(done)))}).")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise HarnessError(f"{out}: exists and is not an empty folder; export never overwrites. Pass a new OUT folder.")
    run_cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    read = {s: done[s] for s in sorted(done) if s <= t} if SF.is_sparse_stage(done[t]) else {t: done[t]}
    sequence_files.verify_stages(run_dir, read, last=max(done))  # nothing damaged goes into an adapter
    with atomic_dir(out) as tmp:
        if SF.is_sparse_stage(done[t]):
            adapters, meta = lori_s_adapters(run_cfg, [done[s] for s in sorted(done) if s <= t])
            config = _lori_s_config(meta, run_cfg.get("model"))
            write_adapters(tmp, adapters, config)
        else:
            _export_dense(done[t], tmp)
    return out


# --- writing -------------------------------------------------------------------------------------
def write_adapters(folder: Path, adapters: list[Adapter], config: dict) -> None:
    """One adapter as it is; several as one adapter of the summed rank (exact ΔW = Σ s B_i A_i)."""
    if len(adapters) > 1:
        adapters, config = [stack(adapters)], {**config, "r": config["r"] * len(adapters),
                                               "lora_alpha": config["lora_alpha"] * len(adapters)}
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
        _export_dense(Path(tmp), folder)


def _export_dense(stage_dir: Path, out: Path) -> None:
    """A stage folder of a dense method (or an older LoRI-S stage): its PEFT files, copied or stacked."""
    files, config = _dense_stage(stage_dir)
    if len(files) == 1:
        for name in (CONFIG, WEIGHTS):
            shutil.copyfile(next(iter(files.values())).parent / name, out / name)
        return
    write_adapters(out, [load_file(str(f)) for f in files.values()], config)


def _dense_stage(stage_dir: Path) -> tuple[dict[str, Path], dict]:
    """(adapter name -> its PEFT weights file, the first adapter's PEFT config) of a stage folder with adapter/."""
    from harness.adapters.lori import AdapterSequence

    info_path = stage_dir / "adapters.json"
    if not info_path.exists():
        raise HarnessError(f"{stage_dir}: neither LoRI-S stage files nor adapters.json; delete the stage folder to redo it.")
    files = {n: AdapterSequence.adapter_file(stage_dir, n) for n in json.loads(info_path.read_text())["adapters"]}
    missing = [str(f) for f in files.values() if not f.exists()]
    if missing:
        raise HarnessError(f"{missing[0]}: adapter file missing; the stage folder is incomplete. Delete it to redo the stage.")
    return files, json.loads((next(iter(files.values())).parent / CONFIG).read_text())


# --- LoRI-S: from the sparse files -----------------------------------------------------------------
def lori_s_adapters(run_cfg: dict, folders: list[Path]) -> tuple[list[Adapter], dict]:
    """Dense (A, B) per adapter after replaying LoRI-S stages `folders` (1..t, in order), A regenerated and verified."""
    from harness.adapters.lori import a_key

    B: dict[str, dict[str, torch.Tensor]] = {}
    A: dict[str, dict[str, torch.Tensor]] = {}
    meta: dict = {}
    d_in: dict[str, int] | None = None
    for folder in folders:
        if not SF.is_sparse_stage(folder):  # an older harness's dense stage: it holds all of A and B so far
            for name, f in _dense_stage(folder)[0].items():
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
    from harness.adapters.lori import a_key, init_A

    suffix = ".lora_B.weight"
    A = {a_key(k): init_A((meta["rank"], d), init=meta["a_init"], seed=meta["seed"], task=meta["a_task"],
                          key=k[: -len(suffix)]).to(dtype) for k, d in d_in.items()}
    if tensors_digest(A) != meta.get("a_sha256"):
        raise HarnessError(f"{folder}/{SF.META}: A regenerated from seed {meta['seed']} does not match the stored sha256 "
                           "(another torch version, or another model than the run's?). Export with the environment that wrote it.")
    return A


def module_d_in(run_cfg: dict, b_keys: list[str]) -> dict[str, int]:
    """d_in of every adapted module, from the model's config on the meta device (no weights)."""
    from harness.models import linear_shapes, model_config

    model = run_cfg.get("model")
    config = model_config(model, cache_dir=run_cfg.get("cache_dir"), trust_remote_code=bool(run_cfg.get("trust_remote_code")))
    if config is None:
        raise HarnessError(f"cannot read the config of model {model!r} here: export needs its module shapes to regenerate A "
                           "(no weights). Make the model available as for `harness run`, then export again.")
    linear = linear_shapes(config)
    prefix, suffix = "base_model.model.", ".lora_B.weight"
    out = {}
    for k in b_keys:
        name = k[: -len(suffix)].removeprefix(prefix)
        if name not in linear:
            raise HarnessError(f"module {name} of the stage files is not a Linear of model {model!r}; was the run made with another model?")
        out[k] = linear[name][1]
    return out


def _lori_s_config(meta: dict, model: str | None) -> dict:
    from harness.adapters.lori import lora_config

    cfg = lora_config(meta["rank"], meta["alpha"], meta["targets"], base_model_name_or_path=model, inference_mode=True).to_dict()
    return json.loads(json.dumps(cfg, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))
