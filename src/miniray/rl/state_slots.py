"""Where each entry of a model's state dict lives, worked out once: ``StateSlots``.

A weight sync reads a model's state dict on one side (the trainer publishing its weights) and
sets it on the other (an engine taking the published tensors), once per step. ``state_dict()``
and ``load_state_dict()`` walk every module for that (1,595 modules of Qwen2.5-0.5B's shape:
~2 ms to read, ~6 ms to assign on the 2-core development machine); the slots know each entry's
module and attribute, so reading is one dict lookup per entry (~0.3 ms) and assigning one
``Parameter`` per entry (~1 ms). A model whose state dict is not just its parameters and
persistent buffers under their own names (state-dict or load hooks, parametrizations, a module
that saves or loads itself its own way) goes through torch's methods, which handle all of that.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from miniray.rl.parallel import share_tied, tied_names

_MODULE = torch.nn.Module


class StateSlots:
    """Each state-dict entry of ``model``: its dtype, device and shape, and the module and
    attribute it lives in (assigning tensors like the ones there changes none of it).
    ``tied``: ``{name: first name}`` of entries that are an earlier entry's tensor."""

    def __init__(self, model: torch.nn.Module):
        self.model: Any = model  # a transformers model has tie_weights()
        state = model.state_dict(keep_vars=True)
        self.names = list(state)
        self.known = frozenset(self.names)
        self.meta = {name: (t.dtype, t.device, t.shape) for name, t in state.items()}
        self.tied = tied_names(model)
        modules = dict(model.named_modules())
        self.where: dict[str, tuple[Any, str]] = {}
        for name in self.names:
            owner, _, attr = name.rpartition(".")
            module = modules.get(owner)
            if module is None or not (attr in module._parameters or attr in module._buffers):
                break
            self.where[name] = (module, attr)
        self.direct = len(self.where) == len(self.names) and not any(
            module._load_state_dict_pre_hooks
            or module._load_state_dict_post_hooks
            or module._state_dict_hooks
            or module._state_dict_pre_hooks
            or getattr(module, "parametrizations", None)
            or type(module)._save_to_state_dict is not _MODULE._save_to_state_dict
            or type(module)._load_from_state_dict is not _MODULE._load_from_state_dict
            for module in modules.values()
        )

    def read(self) -> dict[str, torch.Tensor]:
        """The state dict, detached: the live tensors, not copies; a tied entry is its first
        entry's tensor object."""
        if not self.direct:
            return share_tied(self.model.state_dict(), copy=False)
        out: dict[str, torch.Tensor] = {}
        for name, (module, attr) in self.where.items():
            first = self.tied.get(name)
            if first is not None:
                out[name] = out[first]
                continue
            tensor = module._parameters.get(attr)
            out[name] = (module._buffers[attr] if tensor is None else tensor).detach()
        return out

    def takes(self, name: str, tensor: Any) -> bool:
        """Whether ``tensor`` can become entry ``name`` as it is (same dtype, device, shape)."""
        return isinstance(tensor, torch.Tensor) and self.meta[name] == (
            tensor.dtype,
            tensor.device,
            tensor.shape,
        )

    def assign(self, tensors: Mapping[str, Any]) -> None:
        """Make ``tensors`` the entries they are named for, as they are (``takes`` each). Tied
        entries stay tied: each is its first entry's object again, as the model's
        ``tie_weights()`` would make it (transformers' walk of the model took ~0.5 ms more)."""
        if not self.direct:
            self.model.load_state_dict(tensors, strict=False, assign=True)
            self.model.tie_weights()  # assign=True gave a tied entry a Parameter of its own
            return
        for name, tensor in tensors.items():
            if name in self.tied:
                continue  # set below, from its first entry
            module, attr = self.where[name]
            old = module._parameters.get(attr)
            if old is not None:  # as assign=True does: the parameter's requires_grad kept
                module._parameters[attr] = torch.nn.Parameter(tensor, old.requires_grad)
            else:
                module._buffers[attr] = tensor
        for name, first in self.tied.items():
            (module, attr), (owner, source) = self.where[name], self.where[first]
            table = "_parameters" if attr in module._parameters else "_buffers"
            getattr(module, table)[attr] = getattr(owner, table)[source]
