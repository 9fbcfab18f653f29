"""Data parallelism of the policy on one trainer rank: wrapping the model, and full state dicts.

A rank of the trainer group (``rl.trainer_group``) holds the model wrapped by its strategy:

* ``ddp``: ``torch.nn.parallel.DistributedDataParallel``; every rank holds all the weights
  and the optimizer state, gradients are averaged in the backward pass.
* ``fsdp2``: ``torch.distributed.fsdp.fully_shard`` on each decoder layer and the root; each
  rank holds a shard of the weights, gradients and optimizer state, and gathers a layer's
  weights for its forward and backward. With ``model.dtype=bfloat16`` the shards stay fp32
  (the master weights) and compute runs in bf16 (``MixedPrecisionPolicy``).

What leaves a rank is always the format the rest of miniray knows: a full state dict with
tied entries (embedding and ``lm_head``) as one tensor, gathered from the shards for FSDP2 by
``torch.distributed.checkpoint.state_dict`` (a collective: every rank calls it, rank 0 gets
the tensors). One rank and ``ddp`` wrap nothing: the model trains as it did in one process.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch

__all__ = [
    "STRATEGIES",
    "RankSetup",
    "full_optimizer_state",
    "full_state_dict",
    "load_full_optimizer_state",
    "load_full_state_dict",
    "share_tied",
    "tied_names",
    "wrap",
]

STRATEGIES = ("ddp", "fsdp2")


@dataclass(frozen=True)
class RankSetup:
    """Where one rank runs: its place in the group, its device and the strategy."""

    rank: int = 0
    world_size: int = 1
    device: str = "cpu"  # "cpu" or "cuda:<local rank>"
    strategy: str = "ddp"

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(
                f"actor_rollout_ref.actor.strategy={self.strategy!r} is unknown: must be one "
                f"of {list(STRATEGIES)}"
            )
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank={self.rank} is invalid for world_size={self.world_size}")

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp2"

    @property
    def wrapped(self) -> bool:
        """Whether the model gets a wrapper (FSDP2 always: it needs its mesh even alone)."""
        return self.sharded or self.world_size > 1


def tied_names(model: torch.nn.Module) -> dict[str, str]:
    """``{name: first name}`` of every parameter registered under a second name (a causal LM's
    ``lm_head.weight`` tied to ``model.embed_tokens.weight``). Read before sharding: FSDP2's
    gathered state dict holds the tied entries as two equal tensors."""
    first: dict[int, str] = {}
    tied = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        seen = first.setdefault(id(param), name)
        if seen != name:
            tied[name] = seen
    return tied


def share_tied(state: Mapping[str, torch.Tensor], *, copy: bool) -> dict[str, torch.Tensor]:
    """``state`` detached (cloned with ``copy``), entries that are one tensor under several
    names kept as one tensor, so a copy or a sync moves their bytes once."""
    tensors: dict[tuple, torch.Tensor] = {}
    out = {}
    for name, tensor in state.items():
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        if key not in tensors:
            tensors[key] = tensor.detach().clone() if copy else tensor.detach()
        out[name] = tensors[key]
    return out


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks FSDP2 shards one by one (transformers' ``model.layers``)."""
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise ValueError(
            f"actor_rollout_ref.actor.strategy='fsdp2' shards a causal LM's decoder layers "
            f"(model.model.layers), which {type(model).__name__} does not have; use ddp"
        )
    return list(layers)


def wrap(model: torch.nn.Module, setup: RankSetup, *, compute_dtype: torch.dtype) -> Any:
    """``model`` (on ``setup.device``, in its master dtype) wrapped for ``setup``; needs the
    default process group. ``compute_dtype``: FSDP2's parameter dtype in forward/backward."""
    if not setup.wrapped:
        return model
    device = torch.device(setup.device)
    if not setup.sharded:
        from torch.nn.parallel import DistributedDataParallel

        # No buffer sync per forward: the only buffers are rotary tables, equal on every rank,
        # and a sync per forward would need equal forward counts on every rank. torch 2.13
        # calls that forward_sync_buffers=False (broadcast_buffers is deprecated there, with a
        # FutureWarning from every rank); earlier versions broadcast_buffers=False.
        accepted = inspect.signature(DistributedDataParallel.__init__).parameters
        no_sync = (
            "forward_sync_buffers" if "forward_sync_buffers" in accepted else "broadcast_buffers"
        )
        options: dict[str, Any] = {no_sync: False}
        return DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, **options
        )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (setup.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def full_state_dict(
    wrapped: Any,
    module: torch.nn.Module,
    setup: RankSetup,
    tied: Mapping[str, str],
    *,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """The full weights: live tensors for an unsharded model (the caller copies; it trains in
    its published dtype), gathered CPU copies from FSDP2's shards (collective; only rank 0's
    dict is filled), cast to ``dtype`` (e.g. the published bf16 of fp32 masters)."""
    if not setup.sharded:
        return share_tied(module.state_dict(), copy=False)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # Typed as any state's value (optimizers' too); a model's state holds tensors only.
    state = cast(
        dict[str, torch.Tensor],
        get_model_state_dict(
            wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        ),
    )
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    for name, first in tied.items():
        if name in state and first in state:
            state[name] = state[first]
    return state


def load_full_state_dict(
    wrapped: Any, module: torch.nn.Module, setup: RankSetup, state: Mapping[str, torch.Tensor]
) -> None:
    """Load full weights (every rank passes the whole dict; FSDP2 keeps its shard)."""
    if not setup.sharded:
        module.load_state_dict(dict(state))
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(wrapped, dict(state), options=StateDictOptions(full_state_dict=True))


def full_optimizer_state(wrapped: Any, optimizer: torch.optim.Optimizer, setup: RankSetup) -> Any:
    """The optimizer's state as one rank would hold it (FSDP2: gathered, rank 0's filled)."""
    if not setup.sharded:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    return get_optimizer_state_dict(
        wrapped, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def load_full_optimizer_state(
    wrapped: Any, optimizer: torch.optim.Optimizer, setup: RankSetup, state: Any
) -> None:
    if not setup.sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    set_optimizer_state_dict(
        wrapped, optimizer, state, options=StateDictOptions(full_state_dict=True)
    )
