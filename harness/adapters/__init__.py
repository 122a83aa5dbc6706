"""Adapters on PEFT: LoRI (frozen A, B trained under a mask as sparse values) and the LoRA baseline; mask allocation and LoRI-S stage files."""
