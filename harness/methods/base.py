"""The interface every continual-learning method implements; the scheduler calls only these verbs.

A method owns the adapters of one sequence on one base model. The scheduler asks it, stage by
stage, to set up (begin_stage), for what trains (trainable), for an optional loss term
(extra_loss), to transform the stage's data (train_data), to act after backward and after the
optimizer step (after_backward / after_step), to save and restore (save_stage / restore), to
count parameters (param_counts) and to report diagnostics (diagnostics). Defaults are no-ops, so a
method states only what it changes. Knobs of a method live in its own nested config section
(`knobs`), defined once with defaults and help.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import torch
from pydantic import BaseModel

from harness.checks import Check
from harness.methods.lori import masks as M


@dataclass
class StageContext:
    """What a method may need to set up a stage."""

    stage: int
    task: str
    run_dir: Path
    # calibrate(max_steps, lr_method): train what is trainable now on the stage's data, at that
    # method's learning rate, for max_steps (None: the stage's budget). Used by magnitude masks.
    calibrate: Callable[[int | None, str], Any]
    # The method's tensors saved in this stage's mid-stage checkpoint (a resumed stage), else None.
    resumed_extra: dict[str, torch.Tensor] | None = None
    # batches(indices, batch_size): the stage's training examples (those indices, in that order; None = all) as
    # model inputs (input_ids, attention_mask, labels) on the model's device, for methods that measure the task's
    # data outside training (InfLoRA's input subspace, EWC's Fisher). n_examples: how many there are.
    batches: Callable[[list[int] | None, int], Iterator[dict[str, torch.Tensor]]] | None = None
    n_examples: int = 0
    # The stage's step is compiled (torch.compile, one process): weights a method computes from its parameters are
    # handed to the forward by weight_overrides() rather than installed in the modules (one graph per sequence).
    compiled: bool = False


REGISTRY: dict[str, type["Method"]] = {}


def register(cls: type["Method"]) -> type["Method"]:
    """Class decorator: the method joins the registry under its name (config sections, lr_<family> knobs, CLI flags
    and `harness methods` are built from it). A module outside the package registers by being named in
    $HARNESS_METHODS (harness/methods/__init__.py)."""
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"method {cls.name!r} is registered twice ({REGISTRY[cls.name].__module__}, {cls.__module__})")
    REGISTRY[cls.name] = cls
    return cls


class Method:
    """Base class: plain sequential adapters with no extra term; subclasses override verbs."""

    name: ClassVar[str]
    display: ClassVar[str]  # how reports and tables spell it
    summary: ClassVar[str]  # one line for `harness methods`
    source: ClassVar[str]  # paper and equation
    knobs: ClassVar[type[BaseModel] | None] = None  # nested config section (cfg.<section>)
    section: ClassVar[str | None] = None
    # The knob ("section.knob", its YAML name) that sets how hard the method protects earlier tasks: tuned per suite
    # on the validation split (make tune-baselines; the suite's method_knobs), and named with its value in tables.
    strength: ClassVar[str | None] = None
    flat_knobs: ClassVar[bool] = False  # its knobs were once top-level keys; the old names still work (legacy_keys.py)
    lr_method: ClassVar[str] = (
        "lora"  # the learning-rate family it trains at (knob lr_<family>: lr_lora, lr_lori_s, ...)
    )
    # A method that starts its own family sets lr_method to its name and this to the family's default rate; the config
    # then has a knob lr_<name> and suites may recommend a rate for it (budget.lr).
    lr_default: ClassVar[float | None] = None
    reference: ClassVar[bool] = False  # a reference row (e.g. multi-task upper bound), never ranked as a sequence
    independent_adapters: ClassVar[bool] = False  # per-task adapters can be trained separately (merging)
    a_mode_from_config: ClassVar[bool] = False  # lori-*: cfg.lori.a_mode decides shared/per_task A
    per_task_adapters: ClassVar[bool] = False  # a new adapter per task, earlier ones frozen and active
    train_A: ClassVar[bool] = True  # LoRA trains A; LoRI freezes it

    def __init__(
        self,
        cfg,
        *,
        seed: int,
        tasks: list[str],
        base_model: torch.nn.Module,
        task_examples: Callable[[str], list[dict]] | None = None,
    ):
        self.cfg, self.seed, self.tasks = cfg, seed, list(tasks)
        self.task_examples = task_examples  # task -> its training examples (for methods that revisit earlier tasks)
        from harness.adapters.sequence import (
            AdapterSequence,  # lazy: PEFT loads in ~2 s; config and --help need none of it
        )

        a_mode = cfg.lori.a_mode if self.a_mode_from_config else ("per_task" if self.per_task_adapters else "shared")
        self.adapters = AdapterSequence(
            base_model,
            rank=cfg.rank,
            alpha=cfg.scale_alpha,
            targets=cfg.targets,
            a_init=cfg.a_init,
            a_mode=a_mode,
            train_A=self.train_A,
            seed=seed,
            adapter_dtype=cfg.adapter_dtype,
        )
        self.adapter: str | None = None  # the adapter the current stage trains

    # --- the stage plan ---------------------------------------------------------------------
    @classmethod
    def stage_plan(cls, tasks: list[str]) -> list[list[str]]:
        """Which tasks each stage trains on: one task per stage (a sequence)."""
        return [[t] for t in tasks]

    @classmethod
    def preflight(cls, cfg, shapes: dict[str, tuple[int, int]], n_tasks: int) -> None:
        """Refuse before training what cannot work (e.g. mask capacity); shapes are lora_B (d_out, r)."""

    @classmethod
    def params(cls, cfg) -> dict[str, Any]:
        """Method-specific MLflow params of a sequence."""
        return dict(cfg.model_dump(mode="json").get(cls.section) or {}) if cls.section else {}

    # --- model ------------------------------------------------------------------------------
    @property
    def model(self):
        return self.adapters.model

    def restore(self, done: dict[int, Path]) -> None:
        """Rebuild the state after the committed stages (adapters, masks, buffers)."""
        last = max([t for t in done if t > 0], default=0)
        for t in range(1, last + 1):
            self.adapters.begin_task(t)
            self.restore_stage(t, done[t])
        if last:
            self.adapters.load_weights(done[last])

    def restore_stage(self, t: int, folder: Path) -> None:
        """Per committed stage, in order (after its adapter exists, before weights load)."""

    def begin_stage(self, ctx: StageContext) -> None:
        self.adapter = self.adapters.begin_task(ctx.stage)

    def train_data(self, stage: int, examples: list[dict]) -> list[dict]:
        return examples

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        assert self.model is not None
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    # --- the step ---------------------------------------------------------------------------
    def extra_loss(self) -> torch.Tensor | None:
        return None

    def after_backward(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def weight_overrides(self) -> dict[str, torch.Tensor] | None:
        """{parameter name: tensor} the step's forward uses instead of the model's own (torch.func.functional_call),
        computed outside the compiled graph; None: the model as it is."""
        return None

    # --- the stage's end ----------------------------------------------------------------------
    def checkpoint_extra(self) -> dict[str, torch.Tensor]:
        """Tensors a mid-stage checkpoint must hold besides the weights (e.g. the stage's mask)."""
        return {}

    def end_stage(self) -> dict[str, float]:
        """Close the stage; returns stage statistics to log (e.g. mask density)."""
        return {}

    def save_stage(self, folder: Path) -> None:
        self.adapters.save(folder)

    # --- a committed folder as others read it: `harness export` and `harness verify` --------------
    @classmethod
    def export_reads(cls, stages: list[Path]) -> list[Path]:
        """Of the committed stage folders 1..t (in order), those the export of stage t reads, and verifies first:
        stage t's own folder, which holds the whole adapter for a method that saves PEFT files."""
        return stages[-1:]

    @classmethod
    def export(cls, run_cfg: dict, stages: list[Path], out: Path) -> None:
        """Write a stock PEFT adapter folder (adapter_config.json, adapter_model.safetensors) of the model after the
        last of `stages` (the folders export_reads chose) into the empty folder `out`; run_cfg is the run's config.yaml."""
        from harness.adapters.peft_folder import (
            export_dense,  # lazy: PEFT loads in ~2 s; config and --help need none of it
        )

        export_dense(stages[-1], out)

    @classmethod
    def checks(cls, run_dir: Path, done: dict[int, Path], cfg: dict) -> list[Check]:
        """The method's own invariants of a sequence folder (committed stages `done`, its config.yaml `cfg`), as
        lines of `harness verify`. Reads only."""
        return []

    def param_counts(self) -> dict[str, int]:
        """Trainable parameters of one stage (mask-aware) and the LoRA equivalent at the same rank/targets."""
        counts = M.count_params(self.adapters.linear_shapes(), self.cfg.rank)
        return {
            "trainable_params_effective": counts["lora"] if self.train_A else counts["lori_d"],
            "trainable_params_lora_equivalent": counts["lora"],
        }

    def diagnostics(self) -> dict[str, Any]:
        return {}

    def held_tensors(self) -> list[torch.Tensor]:
        """Tensors the method keeps during a stage besides parameters, gradients and optimizer state (bench --memory)."""
        return []

    def unload(self) -> torch.nn.Module:
        return self.adapters.unload()
