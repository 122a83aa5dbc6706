"""Continual-learning methods, one module each, behind the interface in base.py.

Adding a method: create harness/methods/<name>.py with a subclass of Method (set name, summary,
source; override the verbs it changes; put its knobs in a pydantic model as `knobs` with a
`section` name) and add the class to METHODS below. Config, CLI flags and `harness methods`
pick it up from here.
"""

from __future__ import annotations

from harness.methods.base import Method, StageContext
from harness.methods.ewc import EWC
from harness.methods.inclora import IncLoRA, OLoRA
from harness.methods.inflora import InfLoRA
from harness.methods.lora import SeqLoRA
from harness.methods.lori.method import LoRID, LoRIS
from harness.methods.migu import MIGU
from harness.methods.mtl import MTL
from harness.methods.nlora import NLoRA
from harness.methods.osf import OSF
from harness.methods.replay import Replay
from harness.methods.sdlora import SDLoRA

METHODS: dict[str, type[Method]] = {m.name: m for m in (LoRIS, LoRID, SeqLoRA, IncLoRA, OLoRA, Replay, MTL,
                                                    NLoRA, InfLoRA, EWC, MIGU, SDLoRA, OSF)}

__all__ = ["METHODS", "Method", "StageContext", "get_method"]


def get_method(name: str) -> type[Method]:
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(METHODS)}") from None
