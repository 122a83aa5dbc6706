"""The base model's stage-0 row, general-text CE and general_tasks scores, computed once per experiment and shared.

Every sequence of an experiment starts from the same base model, so its stage-0 evaluation (the b_j of
FWT, on the same fixed documents) and its general-text cross-entropy are the same for every method and
seed. They are computed once and kept in the experiment folder, `base-eval/<digest>.json`, written
atomically. The digest is a SHA-256 over everything they depend on (`cache_key`): the model (its name and a
fingerprint of its weights), the precision, the suite's files (documents included) and data overrides, the
evaluation settings (general_tasks and its knobs, the files of general_include), the tasks, and the versions of
the harness, lm-eval, transformers and torch. Change any of them and the entry is not found, so it is recomputed. Several processes (`--jobs`) share an entry: the
first takes `base-eval/<digest>.lock` and computes, the others wait for it and read.

`base_eval_cache: false` evaluates the base model in every sequence, as the harness did before.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import torch

from harness import __version__
from harness.integrity import file_sha256, folder_hashes
from harness.io import atomic_write_json, read_json
from harness.provenance import git_commit
from harness.run.evaluate import EvalResult

CACHE_DIR = "base-eval"
SAMPLED_VALUES = 4096  # values of each weight tensor that the fingerprint reads (strided over the whole tensor)
EVAL_KNOBS = (
    "eval_batch_size",
    "eval_limit",
    "eval_max_length",
    "eval_merged",
    "eval_bf16",
    "bf16_autocast",
    "general_ce_tokens",
    "general_tasks",
    "general_limit",
    "general_include",
)


@dataclass
class BaseEval:
    """The base model's evaluation, general-text CE and general_tasks record, and the cache entry they came from."""

    result: EvalResult
    general_ce: float | None
    digest: str | None = None  # None: not cached
    cached: bool = False
    general: dict[str, Any] | None = None  # harness/run/general_eval.py's record (None: general_tasks off)


def weights_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter's name, shape and dtype and SAMPLED_VALUES of its values, strided over the tensor.

    Reading every weight of an 8B model would take seconds per sequence; a strided sample of each tensor tells apart
    any two checkpoints in practice (a fine-tune moves every tensor) at a cost that does not grow with the model."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // SAMPLED_VALUES)
            sample = flat[::step][:SAMPLED_VALUES].to("cpu", torch.float32).contiguous()
            h.update(f"{name}|{tuple(p.shape)}|{p.dtype}|".encode())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def cache_key(cfg, suite, model: torch.nn.Module, tasks: list[str]) -> dict[str, Any]:
    """Everything the base model's stage-0 row and general-text CE depend on (JSON data; its digest names the entry)."""
    p = next(model.parameters())
    overrides = {}
    for t in suite.tasks:
        for part in ("_train_override", "_test_override"):
            path = getattr(t, part, None)
            if path is not None and Path(path).is_file():
                overrides[f"{t.name}{part}"] = file_sha256(Path(path))
    return {
        "model": str(cfg.model),
        "weights": weights_fingerprint(model),
        "dtype": str(p.dtype),
        "device": p.device.type,
        "evaluation": {k: str(v) if isinstance(v := getattr(cfg, k), Path) else v for k in EVAL_KNOBS},
        "tasks": list(tasks),
        "suite": folder_hashes(suite.path),
        "data_overrides": overrides,
        "general_include": {  # the user's own task YAMLs
            k: v for k, v in folder_hashes(cfg.general_include).items() if "__pycache__" not in k
        }
        if cfg.general_include
        else None,
        "versions": {
            "harness": __version__,
            "commit": git_commit(),
            "lm_eval": _version("lm_eval"),
            "transformers": _version("transformers"),
            "torch": torch.__version__,
        },
    }


def digest_of(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _record(base: BaseEval, key: dict[str, Any]) -> dict[str, Any]:
    r = base.result
    return {
        "key": key,
        "scores": r.scores,
        "raw": r.raw,
        "wall_s": r.wall_s,
        "n_examples": r.n_examples,
        "documents": r.documents,
        "general_ce": base.general_ce,
        "general": base.general,
    }


def _from_record(data: dict[str, Any], digest: str) -> BaseEval:
    result = EvalResult(
        scores=data["scores"],
        raw=data["raw"],
        wall_s=data["wall_s"],
        n_examples=data["n_examples"],
        documents=data["documents"],
    )
    return BaseEval(result, data["general_ce"], digest, cached=True, general=data.get("general"))


class BaseEvalCache:
    """Stage-0 evaluations of one experiment, in `<experiment>/base-eval/` and this process's memory; folder None: off."""

    def __init__(self, folder: Path | None):
        self.folder = Path(folder) if folder is not None else None
        self.memory: dict[str, BaseEval] = {}

    def get(self, key: dict[str, Any], compute: Callable[[], BaseEval]) -> BaseEval:
        """The entry for key: from memory, else from the folder, else compute() (then kept in both); compute() when off."""
        digest = digest_of(key)
        if self.folder is None:  # the cache is off: every sequence evaluates the base model itself
            base = compute()
            base.digest = digest
            return base
        if digest not in self.memory:
            self.memory[digest] = self._shared(digest, key, compute)
        return self.memory[digest]

    def _shared(self, digest: str, key: dict[str, Any], compute: Callable[[], BaseEval]) -> BaseEval:
        """Under the entry's lock: read it if a process wrote it, else compute and write it (atomically)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{digest}.json"
        fd = os.open(self.folder / f"{digest}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)  # released when this process dies, however it dies
            if path.is_file():
                data = read_json(path)
                if data.get("key") == json.loads(json.dumps(key, default=str)):
                    return _from_record(data, digest)
            base = compute()
            base.digest = digest
            atomic_write_json(path, _record(base, key))
            return base
        finally:
            os.close(fd)
