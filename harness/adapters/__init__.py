"""Adapters: LoRI (frozen A, masked B) and the LoRA baseline, on PEFT; mask allocation."""
