"""Several processes on one stage (torchrun, accelerate launch): process group, rank gating, checks, DDP/FSDP2.

One process (WORLD_SIZE unset or 1) is the normal case: every function here is then a no-op or returns
the trivial answer, no process group is created and nothing changes.

Under a launcher every rank runs the whole scheduler: it loads the model, builds the same adapters and
masks (seeded), draws the same global data order and trains on its slice of each global batch. Rank 0
alone takes locks, writes files, logs to MLflow and evaluates; the others wait at barriers. The stage's
model is wrapped per stage (`StageModel`), because what trains changes from stage to stage:
- ddp: DistributedDataParallel over the PEFT model; parameters stay the same objects, so a method's
  step verbs (after_backward, after_step) act on whole, already averaged gradients and weights.
- fsdp: FSDP2 (`fully_shard`) on a structural copy of the model (same modules, copied; parameters
  replaced by DTensor shards); the originals' storage is released while the stage trains and refilled
  with the gathered weights when it ends, so evaluation and saving see a plain model again. A method's
  step verbs hold the original parameters, not these shards (each rank's rows of dim 0, `p.to_local()`),
  so methods that override them are refused under fsdp (`check_fsdp_method`); LoRI-S is hook-free
  (its mask is applied in the forward pass) and LoRA, LoRI-D, IncLoRA, replay and MTL have no step verbs.
Checkpoints hold full tensors (gathered under FSDP), so a stage can resume with another world size.
"""

from __future__ import annotations

import atexit
import copy
import os
from datetime import timedelta
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import distribute_tensor
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.nn.utils.parametrize import ParametrizationList

from harness.errors import ConfigError, HarnessError
from harness.models.environment import cpu_cores, set_torch_threads
from harness.seeding import tensors_digest

# Bounds a wait at a barrier or collective: rank 0 evaluating a large suite alone can take long. A rank
# that dies does not make the others wait this long: torchrun tears the whole group down.
TIMEOUT = timedelta(minutes=60)
STEP_VERBS = ("extra_loss", "after_backward", "after_step")


# --- who am I (from the launcher's environment; valid before and without a process group) ------
def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size())))


def is_distributed() -> bool:
    return world_size() > 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes files, logs and evaluates."""
    return rank() == 0


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


# --- the process group ------------------------------------------------------------------------
def init(device: str = "auto") -> None:
    """Join the launcher's process group (gloo on CPU, nccl on CUDA); idempotent, a no-op for one process.

    CUDA: rank r uses cuda:LOCAL_RANK, so the device must be auto or cuda (not cuda:N), and a node
    cannot have more processes than GPUs. CPU: each rank gets its share of the cores."""
    if not is_distributed() or _initialized():
        return

    text = str(device).strip().lower()
    cuda = text.startswith("cuda") or (text == "auto" and torch.cuda.is_available())
    if cuda:
        if text not in ("auto", "cuda"):
            raise ConfigError(
                f"device {device!r} under a launch of {world_size()} processes: every rank uses its own GPU "
                "(cuda:LOCAL_RANK). Use --device auto or cuda, and choose GPUs with CUDA_VISIBLE_DEVICES."
            )
        n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if local_world_size() > n_gpus:
            raise HarnessError(
                f"{local_world_size()} processes were launched on this node but it has {n_gpus} CUDA device(s): "
                f"launch at most {n_gpus} (torchrun --nproc_per_node {max(n_gpus, 1)}), or use --device cpu."
            )
        torch.cuda.set_device(local_rank())
    else:
        set_torch_threads(max(1, cpu_cores() // local_world_size()))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    atexit.register(cleanup)


def cleanup() -> None:
    if _initialized():
        dist.destroy_process_group()


def device():
    """This rank's device under CUDA (cuda:LOCAL_RANK), else None."""
    return torch.device("cuda", local_rank()) if _initialized() and dist.get_backend() == "nccl" else None


def barrier() -> None:
    """Wait for every rank (e.g. while rank 0 evaluates and commits a stage)."""
    if _initialized():
        dist.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (decisions rank 0 takes from files: what is finished, the summary)."""
    if not _initialized():
        return obj

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_over_ranks(value):
    """Average of a scalar tensor over ranks (a rank's share of the loss -> the global batch's loss)."""
    if not _initialized():
        return float(value)

    v = value.detach().clone()
    dist.all_reduce(v)
    return float(v) / world_size()


def sum_over_ranks_(tensors: list) -> None:
    """Sum each tensor over ranks in place (e.g. MIGU's per-row output magnitudes, so every rank masks alike)."""
    if not _initialized():
        return

    for t in tensors:
        dist.all_reduce(t)


# --- the same masks and weights on every rank -------------------------------------------------------
def check_identical(tensors: Mapping[str, Any], what: str) -> str:
    """Hash `tensors` on every rank and compare with rank 0's; HarnessError on every rank if any differs."""
    digest = tensors_digest(tensors)
    if not _initialized():
        return digest

    digests: list[str] = [""] * world_size()
    dist.all_gather_object(digests, digest)
    bad = [r for r, d in enumerate(digests) if d != digests[0]]
    if bad:
        raise HarnessError(
            f"{what} differ between ranks (rank 0 {digests[0][:12]}; "
            + ", ".join(f"rank {r} {digests[r][:12]}" for r in bad)
            + "). Every rank must build the same state: same code, config, seed and model files on every node."
        )
    return digest


# --- the launch's constraints --------------------------------------------------------------------------
def check_batch_size(batch_size: int, where: str) -> None:
    """Each rank takes batch_size / world_size examples of every global batch: it must divide."""
    w = world_size()
    if w > 1 and batch_size % w:
        fits = [n for n in range(1, batch_size + 1) if batch_size % n == 0]
        raise ConfigError(
            f"{where}: batch_size {batch_size} is not divisible by the {w} processes of this launch (each rank trains on "
            f"batch_size / {w} examples of every global batch). Set --batch-size to a multiple of {w}, or launch "
            f"{', '.join(map(str, fits))} processes."
        )


def check_fsdp_method(method_cls, base_cls, mode: str) -> None:
    """Under FSDP a method's step verbs would act on its own (released) parameter objects, not on the shards
    that train: refuse methods that override them."""
    if mode != "fsdp" or not is_distributed():
        return
    verbs = [v for v in STEP_VERBS if getattr(method_cls, v) is not getattr(base_cls, v)]
    if verbs:
        raise ConfigError(
            f"method {method_cls.name} acts on whole parameters between backward and the optimizer step ({', '.join(verbs)}), "
            f"which FSDP shards across ranks: run it with --distributed ddp."
        )


def shard(items: list, r: int | None = None, w: int | None = None) -> list:
    """Rank r's contiguous slice of a global batch (sizes differ by at most one; a rank may get none)."""
    r, w = rank() if r is None else r, world_size() if w is None else w
    q, extra = divmod(len(items), w)
    start = r * q + min(r, extra)
    return items[start : start + q + (1 if r < extra else 0)]


# --- the stage's model ------------------------------------------------------------------------------------
class StageModel:
    """What one stage trains: `module` to call, `params` for the optimizer and clipping, `opt` and `sched`.

    `wrap` builds it (one process: the model itself), `full_state` gives full tensors for a checkpoint
    (collective under FSDP: every rank calls it), `close` ends the stage (FSDP: the trained weights go back
    into the original parameters)."""

    def __init__(self, module, params: dict, opt, sched, *, ddp=None, originals: dict | None = None):
        self.module, self.params, self.opt, self.sched = module, params, opt, sched
        self._ddp, self._originals = ddp, originals

    @classmethod
    def wrap(cls, model, params: dict, opt, sched, mode: str, make_optimizer: Callable) -> "StageModel":
        if not is_distributed():
            return cls(model, params, opt, sched)
        if not _initialized():  # e.g. `harness merge` under torchrun: each rank would train its shard alone, silently
            raise HarnessError(
                f"this command was launched as {world_size()} processes (WORLD_SIZE), but only `harness run` "
                "and `harness resume` train a stage across processes: launch it as one process."
            )
        if mode == "fsdp":
            return cls._fsdp(model, params, opt, sched, make_optimizer)

        dev = device()
        ddp = DDP(model, device_ids=[dev.index] if dev is not None else None)
        return cls(ddp, params, opt, sched, ddp=ddp)

    @classmethod
    def _fsdp(cls, model, params: dict, opt, sched, make_optimizer: Callable) -> "StageModel":
        originals = dict(model.named_parameters())
        memo = {id(t): t for t in [*originals.values(), *model.buffers()]}
        clone = copy.deepcopy(model, memo)  # new modules, the same parameter and buffer objects
        mesh = init_device_mesh(next(iter(originals.values())).device.type, (world_size(),))
        lists = [
            m for m in clone.modules() if isinstance(m, torch.nn.ModuleList) and not isinstance(m, ParametrizationList)
        ]
        for block in max(lists, key=len, default=[]):  # the transformer blocks, then the rest at the root
            fully_shard(block, mesh=mesh)
        fully_shard(clone, mesh=mesh)
        for p in originals.values():  # FSDP copied its shards: free the full copies while the stage trains
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        sharded = dict(clone.named_parameters())
        new_params = {n: sharded[n] for n in params}
        new_opt, new_sched = make_optimizer(list(new_params.values()))
        new_opt.load_state_dict(_shard_optimizer_state(opt.state_dict(), list(new_params.values())))
        new_sched.load_state_dict(sched.state_dict())
        for g, lr in zip(new_opt.param_groups, new_sched.get_last_lr()):
            g["lr"] = lr  # a restored schedule's current rate (the constructor set step 0's)
        return cls(clone, new_params, new_opt, new_sched, originals=originals)

    def local_elements(self) -> int:
        """Elements of the trainable parameters this rank holds (under FSDP: its shards only)."""
        return sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in self.params.values())

    def full_state(self) -> tuple[dict, Any]:
        """(parameters, optimizer) as full tensors for StageCheckpointer.save; every rank must call it."""
        if self._originals is None:
            return self.params, self.opt
        return {n: _full(p) for n, p in self.params.items()}, _FullOptimizer(self.opt)

    def close(self) -> None:
        """End the stage: DDP hooks removed; FSDP's trained weights gathered into the original parameters."""
        if self._ddp is not None:
            self._ddp._remove_autograd_hooks()  # shared B persists into the next stage: no stale all-reduce hooks
        if self._originals is not None:
            for n, p in self.module.named_parameters():
                self._originals[n].data = _full(p)
        self.module = self._ddp = self._originals = None


def _full(t):
    """A full, plain tensor from a DTensor shard (collective) or a plain tensor."""
    with torch.no_grad():
        return t.full_tensor().detach() if hasattr(t, "full_tensor") else t.detach()


def _shard_optimizer_state(sd: dict, params: list) -> dict:
    """A plain AdamW state_dict with each per-entry tensor cut into the matching DTensor shard."""
    state = {}
    for i, st in sd["state"].items():
        p = params[i]
        state[i] = {
            k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
            if getattr(v, "shape", None) == p.shape and v.dim() > 0
            else v
            for k, v in st.items()
        }
    return {"state": state, "param_groups": sd["param_groups"]}


class _FullOptimizer:
    """An optimizer seen through full tensors (what StageCheckpointer.save reads: state_dict())."""

    def __init__(self, opt):
        sd = opt.state_dict()
        self._sd = {
            "state": {i: {k: _full(v) for k, v in st.items()} for i, st in sd["state"].items()},
            "param_groups": sd["param_groups"],
        }

    def state_dict(self) -> dict:
        return self._sd


def main_then_all(fn):
    """fn() on rank 0, its result on every rank; a HarnessError it raises is raised on every rank (none waits forever)."""
    result = None
    if is_main():
        try:
            result = (fn(), None)
        except HarnessError as exc:
            result = (None, exc)
    value, err = broadcast_object(result)
    if err is not None:
        raise err
    return value
