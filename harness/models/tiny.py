"""Tiny random Llamas for tests and smoke runs, with a byte-level BPE tokenizer trained on the fly.

The tokenizer is trained once per (vocab size, corpus hash) on ``harness/assets/tiny_corpus.txt``
and cached; the weights are initialised from the seed, so the same (name, seed) is bit-identical.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.models.environment import _build_atomically, default_cache_dir

TINY_CORPUS = Path(__file__).parent.parent / "assets" / "tiny_corpus.txt"
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


def _corpus_digest() -> str:
    return hashlib.sha256(TINY_CORPUS.read_bytes()).hexdigest()[:12]


def _train_tiny_tokenizer(vocab_size: int, out_dir: Path) -> dict:
    """Train a byte-level BPE on the committed corpus and save it as a HF fast tokenizer."""
    from tokenizers import (  # lazy: only the tiny test models build a tokenizer
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        trainers,
    )
    from transformers import (
        PreTrainedTokenizerFast,  # lazy: transformers' models load in ~0.7 s; validation and --help need none
    )

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


def tiny_config(name: str):
    """The LlamaConfig of tiny model ``name`` as far as it is known without its tokenizer."""
    from transformers import LlamaConfig  # lazy: transformers' models load in ~0.7 s; validation and --help need none

    t = _TINY_SPECS[name]
    return LlamaConfig(
        vocab_size=t.vocab,
        hidden_size=t.hidden,
        num_hidden_layers=t.layers,
        num_attention_heads=t.heads,
        num_key_value_heads=t.kv_heads,
        intermediate_size=t.intermediate,
        max_position_embeddings=t.max_positions,
        tie_word_embeddings=True,
        initializer_range=TINY_INIT_STD,
    )


def _load_tiny(name: str, seed: int, cache_dir, device: torch.device, dtype: torch.dtype):
    from transformers import (  # lazy: transformers' models load in ~0.7 s; validation and --help need none
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

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
