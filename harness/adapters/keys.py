"""Keys of a module's LoRA tensors in PEFT's saved adapter files (adapter name stripped); no PEFT import."""

from __future__ import annotations


def b_key(module_name: str) -> str:
    """Key of a module's lora_B weight in PEFT's saved adapter file (adapter name stripped)."""
    return f"{module_name}.lora_B.weight"


def a_key(b: str) -> str:
    """The lora_A key of the module whose lora_B key is `b`."""
    return b[: -len("lora_B.weight")] + "lora_A.weight"
