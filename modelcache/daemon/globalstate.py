"""Process-global state that transformers' loading mutates, and how to keep it intact.

Measured with transformers 5.23.0 / torch 2.13.0 (issue #2, seed 003): concurrent
``from_pretrained`` calls race on context managers that swap module attributes
(``no_init_weights``, ``no_tie_weights``, ``meta_device_safe_creation_ops``) and on the
default dtype, and can leave them swapped *after* every call returned: ``tie_weights``
a no-op, ``torch.nn.init.*`` no-ops, ``torch.linspace`` patched, default dtype bfloat16.
A later, perfectly serial load then builds a model with a meta or random ``lm_head``.

modelcache never builds two models at once (``LOAD_LOCK``: every stretch of a load that
builds or changes modules holds it; only a streamed load's reads and copies run outside it,
see loader.py), but third-party code in the same process may not. So every such stretch is
bracketed by ``check_and_restore``: it compares each tracked attribute with the value
captured at import (on the main thread, before any worker exists), puts back what differs,
and reports it so it can be counted.
"""

from __future__ import annotations

import importlib
import sys
import threading
from dataclasses import dataclass
from typing import Any

import torch
import transformers  # noqa: F401  - imported eagerly on the main thread (seed 003)
from transformers import initialization as hf_init
from transformers.modeling_utils import PreTrainedModel

#: Held by every stretch of a load that builds or changes modules (loader._global_phase).
LOAD_LOCK = threading.RLock()

_PRETRAINED_METHODS = (
    "tie_weights",
    "init_weights",
    "_init_weights",
    "post_init",
    "_initialize_weights",
)
_TORCH_FUNCTIONS = (
    "linspace",
    "arange",
    "empty",
    "zeros",
    "ones",
    "full",
    "rand",
    "randn",
    "normal",
    "tensor",
)


@dataclass(frozen=True)
class _Slot:
    owner: Any
    attr: str
    value: Any

    @property
    def label(self) -> str:
        name = getattr(self.owner, "__name__", type(self.owner).__name__)
        return f"{name}.{self.attr}"


def _capture() -> list[_Slot]:
    slots: list[_Slot] = []
    for module_name in hf_init.TORCH_MODULES_TO_PATCH:
        module = sys.modules.get(module_name) or importlib.import_module(module_name)
        for fn in hf_init.TORCH_INIT_FUNCTIONS:
            if hasattr(module, fn):
                slots.append(_Slot(module, fn, getattr(module, fn)))
    for fn in _TORCH_FUNCTIONS:
        slots.append(_Slot(torch, fn, getattr(torch, fn)))
    for meth in _PRETRAINED_METHODS:
        if meth in PreTrainedModel.__dict__:
            slots.append(_Slot(PreTrainedModel, meth, PreTrainedModel.__dict__[meth]))
    for meth in ("register_parameter", "register_buffer"):
        slots.append(_Slot(torch.nn.Module, meth, torch.nn.Module.__dict__[meth]))
    return slots


_PRISTINE = _capture()
_PRISTINE_DTYPE = torch.get_default_dtype()
_PRISTINE_DEVICE = torch.get_default_device()


def check_and_restore() -> list[str]:
    """Restore every tracked global to its pristine value; return what had changed."""
    changed: list[str] = []
    for slot in _PRISTINE:
        current = (
            slot.owner.__dict__.get(slot.attr)
            if isinstance(slot.owner, type)
            else getattr(slot.owner, slot.attr, None)
        )
        if current is not slot.value:
            changed.append(slot.label)
            setattr(slot.owner, slot.attr, slot.value)
    if torch.get_default_dtype() != _PRISTINE_DTYPE:
        changed.append(f"torch default dtype ({torch.get_default_dtype()})")
        torch.set_default_dtype(_PRISTINE_DTYPE)
    if torch.get_default_device() != _PRISTINE_DEVICE:
        changed.append(f"torch default device ({torch.get_default_device()})")
        torch.set_default_device(None if _PRISTINE_DEVICE.type == "cpu" else _PRISTINE_DEVICE)
    return changed
