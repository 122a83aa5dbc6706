"""Mid-stage checkpoints: a killed stage continues from its last checkpoint, bit for bit on CPU.

`<sequence>/checkpoint/` holds the stage in progress (only the latest; removed when the stage
commits):
    tensors.safetensors  trainable tensors (param/<name>), AdamW state (opt/<i>/<key>), RNG states
                         (rng/data = the stage's data-order generator, rng/torch_cpu, rng/cuda<i>)
                         and whatever the method must keep (extra/<key>: the stage's mask)
    state.json           stage, task, step, tokens, losses, remaining data order, training seconds,
                         optimizer param groups and LR-scheduler state (plain JSON: no pickles)
The folder appears by atomic rename, so a checkpoint is complete or absent. A checkpoint of a
stage that has since been committed is stale and is deleted.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from harness import faults
from harness.errors import HarnessError
from harness.io import atomic_dir, check_free_space, read_json

CKPT_DIR = "checkpoint"


@dataclass
class Progress:
    """Where a stage's training stands: restored from a checkpoint, continued by the loop."""

    step: int = 0
    tokens: int = 0
    wall_s: float = 0.0
    losses: list[float] = field(default_factory=list)
    order: list[int] = field(default_factory=list)  # data indices not yet drawn this epoch


def _optimizer_split(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for key, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt/{idx}/{key}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_join(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, v in tensors.items():
        if name.startswith("opt/"):
            _, idx, key = name.split("/", 2)
            state.setdefault(int(idx), {})[key] = v
    for idx, st in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(st)
    return {"state": state, "param_groups": meta["param_groups"]}


class StageCheckpointer:
    """Saves every `every` optimizer steps and once when training ends; restores on resume."""

    def __init__(self, run_dir: Path, stage: int, task: str, every: int, extra: dict[str, torch.Tensor] | None = None):
        self.run_dir, self.stage, self.task, self.every = Path(run_dir), stage, task, every
        self.extra = dict(extra or {})
        self.path = self.run_dir / CKPT_DIR
        self.saves = 0
        self.save_s = 0.0
        self.restored_train_s = 0.0  # training seconds an earlier process spent on this stage (0 unless restored)

    # --- reading ----------------------------------------------------------------------------
    def _matches(self) -> bool:
        p = self.path / "state.json"
        if not p.exists():
            return False
        st = read_json(p)
        return st.get("stage") == self.stage and st.get("task") == self.task

    def load_extra(self) -> dict[str, torch.Tensor] | None:
        """The method's tensors (e.g. the stage's mask) from this stage's checkpoint, if there is one."""
        if not self._matches():
            return None
        tensors = load_file(str(self.path / "tensors.safetensors"))
        return {k[len("extra/") :]: v for k, v in tensors.items() if k.startswith("extra/")}

    def restore(self, params: dict[str, torch.nn.Parameter], opt, sched, gen: torch.Generator) -> Progress | None:
        """Put the stage back where its checkpoint left it; None when there is none for this stage."""
        if not self._matches():
            return None
        st = read_json(self.path / "state.json")
        tensors = load_file(str(self.path / "tensors.safetensors"))
        missing = [n for n in params if f"param/{n}" not in tensors]
        if missing:  # written by a harness whose trainable tensors differ (e.g. LoRI-S before its sparse state)
            raise HarnessError(
                f"{self.path}: this mid-stage checkpoint of stage {self.stage} ({self.task}) does not hold this harness's "
                f"trainable tensors (missing {len(missing)}, e.g. {missing[0]}); it was written by another harness version. "
                f"Delete that folder and run the same command again: stage {self.stage} restarts from its beginning and "
                f"the committed stages are kept."
            )
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(tensors[f"param/{n}"].to(p.device, p.dtype))
        opt.load_state_dict(_optimizer_join(tensors, st["optimizer"]))
        sched.load_state_dict(st["scheduler"])
        gen.set_state(tensors["rng/data"])
        torch.set_rng_state(tensors["rng/torch_cpu"])
        for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
            if f"rng/cuda{i}" in tensors:
                torch.cuda.set_rng_state(tensors[f"rng/cuda{i}"], i)
        self.restored_train_s = st["wall_s"]
        return Progress(
            step=st["step"], tokens=st["tokens"], wall_s=st["wall_s"], losses=st["losses"], order=st["order"]
        )

    # --- writing ----------------------------------------------------------------------------
    def due(self, step: int, total: int) -> bool:
        return step == total or (self.every > 0 and step % self.every == 0)

    def save(self, params: dict[str, torch.nn.Parameter], opt, sched, gen: torch.Generator, progress: Progress) -> None:
        t0 = time.perf_counter()
        tensors = {f"param/{n}": p.detach().cpu().contiguous() for n, p in params.items()}
        opt_tensors, opt_meta = _optimizer_split(opt)
        tensors.update(opt_tensors)
        tensors["rng/data"] = gen.get_state()
        tensors["rng/torch_cpu"] = torch.get_rng_state()
        for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
            tensors[f"rng/cuda{i}"] = torch.cuda.get_rng_state(i)
        tensors.update({f"extra/{k}": v.detach().cpu().contiguous() for k, v in self.extra.items()})
        state = {
            "stage": self.stage,
            "task": self.task,
            "step": progress.step,
            "tokens": progress.tokens,
            "wall_s": progress.wall_s,
            "losses": progress.losses,
            "order": progress.order,
            "optimizer": opt_meta,
            "scheduler": sched.state_dict(),
        }
        need = sum(t.numel() * t.element_size() for t in tensors.values()) + len(json.dumps(state))
        check_free_space(self.run_dir, need, f"the mid-stage checkpoint of stage {self.stage} ({self.task})")
        with atomic_dir(self.path, need=need) as tmp:
            save_file(tensors, str(tmp / "tensors.safetensors"))
            faults.pause("checkpoint-write", self.run_dir, self.stage)
            (tmp / "state.json").write_text(json.dumps(state))
        self.saves += 1
        self.save_s += time.perf_counter() - t0


def remove_checkpoint(run_dir: Path) -> None:
    """Drop the mid-stage checkpoint (after its stage committed, or when it is stale)."""
    shutil.rmtree(Path(run_dir) / CKPT_DIR, ignore_errors=True)
