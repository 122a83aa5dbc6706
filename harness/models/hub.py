"""Hugging Face hub ids and local checkpoint directories: availability checks, messages, loading.

Hub downloads are OFF unless asked for (see :func:`harness.models.environment.downloads_allowed`);
offline, a model must already be in the local HF cache, and a missing one is reported at once.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from pathlib import Path

import torch

from harness.errors import ModelUnavailableError
from harness.models.catalog import BUILTIN_MODELS
from harness.models.environment import _hf_hub_cache, downloads_allowed, logger

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_GATED = "it is gated on the Hugging Face hub and this token (HF_TOKEN) has no access"


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1


def _unavailable_hub_message(name: str, reason: str) -> str:
    return (
        f"Model '{name}' is not available: {reason}. To make it available, run "
        f"`hf download {name}` (formerly `huggingface-cli download`) on a machine with access and "
        f"copy the Hugging Face cache here (HF_HOME), or set HF_HUB_OFFLINE=0 (plus HF_TOKEN for "
        f"gated models, after accepting the license on huggingface.co) to let the harness download "
        f"it, or pass a local checkpoint directory as the model name. Built-in models that work "
        f"offline: {', '.join(BUILTIN_MODELS)}."
    )


def _cached_hub_files_missing(name: str, hf_cache: Path) -> str | None:
    """None if config and weights of ``name`` are in the local HF cache, else what is missing."""
    from huggingface_hub import try_to_load_from_cache  # lazy: only hub models need it

    if not isinstance(try_to_load_from_cache(name, "config.json", cache_dir=hf_cache), str):
        return "config.json"
    for weights in _WEIGHT_FILES:
        found = try_to_load_from_cache(name, weights, cache_dir=hf_cache)
        if not isinstance(found, str):
            continue
        if not weights.endswith(".index.json"):
            return None
        try:
            shards = set(json.loads(Path(found).read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError):
            return weights
        missing = [
            s for s in sorted(shards) if not isinstance(try_to_load_from_cache(name, s, cache_dir=hf_cache), str)
        ]
        return f"weight shards {', '.join(missing[:3])}{'...' if len(missing) > 3 else ''}" if missing else None
    return "weights (model.safetensors or pytorch_model.bin)"


def _check_hub_id(name: str) -> None:
    hf_cache = _hf_hub_cache()
    missing = _cached_hub_files_missing(name, hf_cache)
    if missing is None:
        return
    if not downloads_allowed():
        state = os.environ.get("HF_HUB_OFFLINE")
        why = f"HF_HUB_OFFLINE={state}" if state is not None else "HF_HUB_OFFLINE is unset: the harness stays offline"
        raise ModelUnavailableError(
            _unavailable_hub_message(
                name, f"its {missing} is not in the local Hugging Face cache ({hf_cache}) and downloads are off ({why})"
            )
        )
    # Downloads allowed: one cheap metadata request tells missing/gated apart before a big download.
    from huggingface_hub import auth_check  # lazy: only hub models need it
    from huggingface_hub.errors import (  # lazy: only hub models need it
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
    )

    try:
        auth_check(name)
    except GatedRepoError:
        raise ModelUnavailableError(_unavailable_hub_message(name, _GATED)) from None
    except RepositoryNotFoundError:
        raise ModelUnavailableError(
            _unavailable_hub_message(
                name, "no such repository on the Hugging Face hub (or it is private and HF_TOKEN lacks access)"
            )
        ) from None
    except (HfHubHTTPError, OSError) as exc:
        raise ModelUnavailableError(
            _unavailable_hub_message(
                name, f"it is not cached locally and the hub could not be reached ({type(exc).__name__})"
            )
        ) from None


def check_pretrained_available(name: str) -> None:
    """The non-built-in part of ``check_model_available``: a local directory, a hub id, or a bare word."""
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelUnavailableError(
                f"Model directory '{name}' has no config.json, so it is not a Hugging Face checkpoint. "
                "Point to the folder written by save_pretrained (config.json + weights), "
                "or use a hub id or a built-in model."
            )
        return
    if _looks_like_path(name):
        raise ModelUnavailableError(
            f"Model directory '{name}' does not exist. Pass an existing checkpoint directory, "
            f"a Hugging Face hub id (org/name), or a built-in model ({', '.join(BUILTIN_MODELS)})."
        )
    if _HUB_ID.match(name):
        _check_hub_id(name)
        return
    # A bare word: most likely a typo of a built-in name; legacy hub ids ("gpt2") only if cached.
    if _cached_hub_files_missing(name, _hf_hub_cache()) is None:
        return
    close = difflib.get_close_matches(name, list(BUILTIN_MODELS), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    listing = "; ".join(f"{k}: {v}" for k, v in BUILTIN_MODELS.items())
    raise ModelUnavailableError(
        f"Unknown model '{name}': it is not a built-in model, not an existing directory, and not a "
        f"Hugging Face hub id of the form org/name.{hint} Built-in models: {listing}."
    )


def _load_pretrained(name: str, device: torch.device, dtype: torch.dtype, trust_remote_code: bool):
    from huggingface_hub.errors import GatedRepoError  # lazy: only hub models need it
    from transformers import (  # lazy: transformers' models load in ~0.7 s; validation and --help need none
        AutoModelForCausalLM,
        AutoTokenizer,
    )

    local = Path(name).expanduser()
    is_local = local.is_dir()
    source = str(local) if is_local else name
    kwargs: dict = {"trust_remote_code": trust_remote_code, "local_files_only": is_local or not downloads_allowed()}
    if not is_local:
        # Read at call time: huggingface_hub froze its own idea of the cache dir at import.
        kwargs["cache_dir"] = str(_hf_hub_cache())
    model_kwargs: dict = {"dtype": dtype}
    if device.type == "cuda":
        # Load straight onto the GPU: an 8B model staged in CPU RAM first needs 16+ GB there.
        model_kwargs["device_map"] = {"": str(device)}
    logger.info("loading %s (%s, %s)", source, device, str(dtype).removeprefix("torch."))
    part = "tokenizer"
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        part = "model"
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs, **model_kwargs)
    except GatedRepoError:
        raise ModelUnavailableError(_unavailable_hub_message(name, _GATED)) from None
    # transformers reports missing files and hub trouble as OSError, an unusable tokenizer or
    # an unknown architecture as ValueError; either way the user needs the cause, not a traceback.
    except (OSError, ValueError) as exc:
        if "trust_remote_code" in str(exc):
            raise ModelUnavailableError(
                f"Model '{name}' needs its own Python code from the hub, which is not run by default. "
                "If you trust the repository, pass trust_remote_code=True."
            ) from None
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if is_local:
            raise ModelUnavailableError(
                f"Model directory '{name}' could not be loaded: its {part} failed ({first_line}). "
                "It should hold what save_pretrained writes for both the model and its tokenizer."
            ) from None
        raise ModelUnavailableError(
            _unavailable_hub_message(name, f"its {part} could not be loaded ({first_line})")
        ) from None
    if device.type != "cuda":
        model = model.to(device)
    return model, tokenizer
