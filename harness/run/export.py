"""`harness export RUN_DIR [--stage t] OUT`: a stock PEFT adapter folder of a sequence at one of its stages.

OUT holds adapter_config.json + adapter_model.safetensors; PeftModel.from_pretrained(base_model, OUT)
gives the harness's model at that stage. Where the stage has one adapter (lora, replay, mtl, lori-d
and lori-s with a_mode shared) the tensors are the harness's own, so the logits are bit-identical.
Methods with one adapter per task (inclora, olora, a_mode per_task) are exported as the exact sum
Σ_t s·B_t·A_t in ONE adapter of rank T·r (A's stacked, B's side by side, lora_alpha T·alpha so the
scaling stays alpha/r): the same ΔW, logits equal up to float summation order (PEFT adds the
adapters one by one; the stacked matmul sums over all T·r ranks at once).

How is the method's (Method.export_reads / Method.export): dense methods' stage folders already hold PEFT files
(copied, or stacked); LoRI-S stage folders hold only masks and values, so B is rebuilt by replaying stages 1..t and
A regenerated from its seed (harness/methods/lori/export.py); OSF sums stages 1..t's updates.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from harness.errors import HarnessError
from harness.io import atomic_dir
from harness.methods import METHODS
from harness.run.folder import committed_stages, verify_stages


def trained_stages(run_dir: Path) -> dict[int, Path]:
    """Training stages (t >= 1) whose commit marker exists (read only: unlike a resume, nothing is cleaned up)."""
    return {t: p for t, p in committed_stages(run_dir).items() if t > 0}


def method_of(run_dir: Path, run_cfg: dict) -> str | None:
    """The sequence's method: its config's sequence block, else (folders written before it recorded one) the run's
    only method, else the folder's place in the layout (<method>/seed-<s>[/order-<k>])."""
    name = (run_cfg.get("sequence") or {}).get("method")
    if name is None and len(run_cfg.get("methods") or []) == 1:
        name = run_cfg["methods"][0]
    if name is None:
        up = run_dir.parent.parent if run_dir.name.startswith("order-") else run_dir.parent
        name = up.name if up.name in METHODS else None
    return name


def export_adapter(run_dir: Path, out: Path, stage: int | None = None) -> Path:
    """Write the PEFT adapter of sequence folder `run_dir` at committed stage `stage` (default: the last) to `out`."""
    run_dir, out = Path(run_dir), Path(out)
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "stages").is_dir():
        raise HarnessError(
            f"{run_dir}: not a sequence folder (it has no config.yaml and stages/). Pass the folder of one "
            "sequence: results/<experiment>/<method>/seed-<s>[/order-<k>]."
        )
    done = trained_stages(run_dir)
    if not done:
        raise HarnessError(f"{run_dir}: no training stage is committed yet; run or resume the sequence first.")
    t = max(done) if stage is None else stage
    if t not in done:
        raise HarnessError(
            f"--stage {t}: stage {t} is not committed in {run_dir} (committed: {', '.join(map(str, sorted(done)))})."
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise HarnessError(f"{out}: exists and is not an empty folder; export never overwrites. Pass a new OUT folder.")
    run_cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    name = method_of(run_dir, run_cfg)
    if name not in METHODS:
        raise HarnessError(
            f"{run_dir}: method {name!r} of this sequence is not registered here; a method from outside "
            f"the package is registered by naming its module in $HARNESS_METHODS (docs/methods.md)"
        )
    method = METHODS[name]
    read = method.export_reads([done[s] for s in sorted(done) if s <= t])  # the method's export: Method.export
    verify_stages(
        run_dir, {s: p for s, p in done.items() if p in read}, last=max(done)
    )  # nothing damaged goes into an adapter
    with atomic_dir(out) as tmp:
        method.export(run_cfg, read, tmp)
    return out
