"""LoRI on PEFT's LoRA layers: W = W0 + s·(B ⊙ M)·A with A frozen and random, B trained under M.

AdapterSequence holds the PEFT adapters of one sequence (the methods in harness/methods/ decide
what trains). A modes: `shared` (one adapter for the whole sequence; task t trains B under M_t and
every other entry stays bit-identical) or `per_task` (adapter `task<t>` with its own seeded A_t and
B_t; all are active; only B_t trains). A is seeded from (run seed, task index, module key) and
stored with the adapter.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterator

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

from harness.adapters.keys import b_key
from harness.errors import HarnessError
from harness.precision import adapter_torch_dtype
from harness.seeding import stable_seed


def init_A(shape: tuple[int, int], *, init: str, seed: int, task: int, key: str) -> torch.Tensor:
    """Seeded frozen projection (r x d_in), generated in fp32 on CPU so every device gets the same A."""
    g = torch.Generator().manual_seed(stable_seed(seed, task, key))
    d_in = shape[1]
    if init == "kaiming_uniform":
        # PEFT's default LoRA-A init (kaiming_uniform, a=sqrt(5)) is U(-1/sqrt(d_in), 1/sqrt(d_in)).
        bound = 1.0 / math.sqrt(d_in)
        return (torch.rand(shape, generator=g) * 2 - 1) * bound
    if init == "gaussian":
        # Same variance as the uniform init: 1 / (3 d_in).
        return torch.randn(shape, generator=g) / math.sqrt(3 * d_in)
    raise ValueError(f"unknown a_init {init!r}")


def lora_config(rank: int, alpha: float, targets: list[str], **kw) -> LoraConfig:
    """The PEFT config of every adapter here (and of exported ones): no dropout, no bias, scaling alpha / r."""
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, bias="none", **kw)


class AdapterSequence:
    """The adapters of one sequence on one base model: create per task, freeze, save, load."""

    def __init__(
        self,
        base_model: torch.nn.Module,
        *,
        rank: int,
        alpha: float,
        targets: list[str],
        a_init: str = "kaiming_uniform",
        a_mode: str = "shared",
        train_A: bool = False,
        seed: int = 0,
        adapter_dtype: str = "fp32",
    ):
        self.rank, self.alpha, self.targets = rank, alpha, list(targets)
        self.adapter_dtype = adapter_dtype  # fp32 whatever the base dtype, or the base's (harness/precision.py)
        self.a_init, self.a_mode, self.train_A, self.seed = a_init, a_mode, train_A, seed
        self.base_model = base_model
        self.model: PeftModel | None = None
        self.adapters: list[str] = []  # in task order (one entry in shared mode)

    # --- structure -------------------------------------------------------------------------------
    def _lora_config(self) -> LoraConfig:
        return lora_config(self.rank, self.alpha, self.targets)

    def a_task(self, t: int) -> int:
        """The task index A is seeded from: t (per_task) or 1 (one shared A)."""
        return t if self.a_mode == "per_task" else 1

    def adapter_for_task(self, t: int) -> str:
        return f"task{t}" if self.a_mode == "per_task" else "default"

    def layers(self) -> Iterator[tuple[str, LoraLayer]]:
        assert self.model is not None
        for name, mod in self.model.named_modules():
            if isinstance(mod, LoraLayer):
                yield name, mod

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(d_out, d_in) of every adapted module."""
        return {n: (m.out_features, m.in_features) for n, m in self.layers()}

    def begin_task(self, t: int) -> str:
        """Make the adapter that task t (1-based) trains; set requires_grad for exactly what trains."""
        name = self.adapter_for_task(t)
        if self.model is None:
            try:
                self.model = get_peft_model(
                    self.base_model,
                    self._lora_config(),
                    adapter_name=name,
                    autocast_adapter_dtype=self.adapter_dtype == "fp32",
                )
            except ValueError as exc:
                raise HarnessError(
                    f"cannot attach adapters to targets {self.targets}: {exc}. Set `targets` to module names "
                    "that exist in this model (e.g. q_proj,v_proj)."
                ) from None
            self._init_adapter(name, t)
            self.adapters.append(name)
        elif name not in self.adapters:
            self.model.add_adapter(name, self._lora_config(), autocast_adapter_dtype=self.adapter_dtype == "fp32")
            self._init_adapter(name, t)
            self.adapters.append(name)
        # All adapters active (per_task: ΔW = Σ_t s (B_t ⊙ M_t) A_t); set_adapter re-enables grads,
        # so the freezing below must come after it.
        self.model.base_model.set_adapter(list(self.adapters))
        self.freeze_for(name)
        return name

    @torch.no_grad()
    def _init_adapter(self, name: str, t: int) -> None:
        want = adapter_torch_dtype(self.adapter_dtype, self.base_dtype())
        for mod_name, layer in self.layers():
            A = layer.lora_A[name].weight
            A.copy_(init_A(tuple(A.shape), init=self.a_init, seed=self.seed, task=self.a_task(t), key=mod_name))
            layer.lora_B[name].weight.zero_()
            for part in (layer.lora_A[name].weight, layer.lora_B[name].weight):
                if part.dtype != want:  # the precision policy, checked where the tensors are made
                    raise HarnessError(
                        f"{mod_name}: adapter {name!r} is {part.dtype}, the policy says {want} "
                        f"(adapter_dtype {self.adapter_dtype}); this PEFT version casts adapters differently"
                    )

    def base_dtype(self) -> torch.dtype:
        """The dtype of the frozen base weights of the adapted layers."""
        return next(layer.base_layer.weight.dtype for _, layer in self.layers())

    def freeze_for(self, trained: str) -> None:
        """Only the current adapter's B (and A when A trains) require grad; assert it."""
        assert self.model is not None
        for p in self.model.parameters():
            p.requires_grad_(False)
        for _, layer in self.layers():
            layer.lora_B[trained].weight.requires_grad_(True)
            if self.train_A:
                layer.lora_A[trained].weight.requires_grad_(True)
        for n, p in self.model.named_parameters():
            if p.requires_grad:
                assert (f"lora_B.{trained}." in n) or (self.train_A and f"lora_A.{trained}." in n), n

    def b_params(self, adapter: str) -> dict[str, torch.nn.Parameter]:
        return {k: m.weight for k, m in self.b_modules(adapter).items()}

    def b_modules(self, adapter: str) -> dict[str, torch.nn.Linear]:
        """The lora_B Linear of every adapted module, keyed like the adapter files (for SparseStage)."""
        return {b_key(n): layer.lora_B[adapter] for n, layer in self.layers()}

    def a_tensors(self, adapter: str) -> dict[str, torch.Tensor]:
        return {b_key(n): layer.lora_A[adapter].weight.detach() for n, layer in self.layers()}

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        assert self.model is not None
        return [p for p in self.model.parameters() if p.requires_grad]

    # --- persistence -----------------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        """Adapter weights in PEFT's layout (safetensors): `adapter/` (default) or `adapter/task<t>/`."""
        assert self.model is not None
        self.model.save_pretrained(
            str(folder / "adapter"), selected_adapters=list(self.adapters), safe_serialization=True
        )
        meta = {
            "a_mode": self.a_mode,
            "train_A": self.train_A,
            "adapters": self.adapters,
            "rank": self.rank,
            "alpha": self.alpha,
        }
        (folder / "adapters.json").write_text(json.dumps(meta, indent=2))

    @staticmethod
    def adapter_file(folder: Path, adapter: str) -> Path:
        # PEFT stores the "default" adapter at the root, others in a sub-folder named after them.
        root = folder / "adapter"
        return (
            root / "adapter_model.safetensors" if adapter == "default" else root / adapter / "adapter_model.safetensors"
        )

    @torch.no_grad()
    def load_weights(self, folder: Path) -> None:
        """Load every adapter's tensors from a stage folder; shapes and keys must match exactly."""
        assert self.model is not None
        for name in self.adapters:
            path = self.adapter_file(folder, name)
            if not path.exists():
                raise HarnessError(
                    f"{path}: adapter file missing; the stage folder is incomplete. Delete it to redo the stage."
                )
            sd = load_file(str(path))
            expected = get_peft_model_state_dict(self.model, adapter_name=name)
            missing = set(expected) - set(sd)
            bad = [k for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
            if missing or bad:
                raise HarnessError(
                    f"{path}: does not match this config's adapters (missing keys: {sorted(missing)[:3]}, "
                    f"shape mismatches: {bad[:3]}). Was it written with another model, rank or targets?"
                )
            set_peft_model_state_dict(self.model, sd, adapter_name=name)
        self.model.base_model.set_adapter(list(self.adapters))

    def unload(self) -> torch.nn.Module:
        """Remove the adapters and return the untouched base model (for the next sequence)."""
        assert self.model is not None
        base = self.model.unload()
        self.model = None
        self.adapters = []
        return base
