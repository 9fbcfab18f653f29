"""Checks on what workers send: same structure as everyone else, and finite values.

A structural mismatch (length, shape, dtype) is a programming error in the worker, so the whole
round fails with a ``ValueError`` naming the worker and the parameter index. A non-finite value
(NaN/Inf) is a numerical accident of one worker, so that worker is left out of the round and
counted, and training goes on with the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def describe(weights: Sequence[torch.Tensor]) -> list[tuple[tuple[int, ...], torch.dtype]]:
    return [(tuple(t.shape), t.dtype) for t in weights]


def check_weight_list(weights: Any, worker_id: int, what: str = "get_weights()") -> None:
    """``weights`` must be a list/tuple of tensors."""
    if not isinstance(weights, (list, tuple)):
        raise ValueError(
            f"worker {worker_id}: {what} returned a {type(weights).__name__}; "
            "the rule is a list of torch.Tensor in parameter order"
        )
    for p_idx, t in enumerate(weights):
        if not isinstance(t, torch.Tensor):
            raise ValueError(
                f"worker {worker_id}: {what} parameter {p_idx} is a {type(t).__name__}, "
                "not a torch.Tensor"
            )


def check_same_structure(
    reference: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    worker_id: int,
    *,
    reference_name: str,
    check_dtype: bool = True,
) -> None:
    """Raise ``ValueError`` naming the worker and parameter where ``weights`` differs."""
    if len(weights) != len(reference):
        raise ValueError(
            f"worker {worker_id}: sent {len(weights)} tensors but {reference_name} has "
            f"{len(reference)}; every worker must send the same parameter list"
        )
    for p_idx, (ref, t) in enumerate(zip(reference, weights)):
        if tuple(t.shape) != tuple(ref.shape):
            raise ValueError(
                f"worker {worker_id}: parameter {p_idx} has shape {tuple(t.shape)} but "
                f"{reference_name} has {tuple(ref.shape)}"
            )
        if check_dtype and t.dtype != ref.dtype:
            raise ValueError(
                f"worker {worker_id}: parameter {p_idx} has dtype {t.dtype} but "
                f"{reference_name} has {ref.dtype}"
            )
        if not check_dtype and torch.is_floating_point(t) != torch.is_floating_point(ref):
            raise ValueError(
                f"worker {worker_id}: parameter {p_idx} has dtype {t.dtype} but "
                f"{reference_name} has {ref.dtype}; a floating update needs a floating parameter"
            )


def check_round(
    values: dict[int, Any], method: str, global_weights: Sequence[torch.Tensor] | None
) -> None:
    """Every worker's values must match the global weights (or the first worker's, before
    there are any): a ``ValueError`` names the first worker and parameter that do not."""
    for wid in sorted(values):
        check_weight_list(values[wid], wid, f"{method}()")
    if global_weights is not None:
        reference, name = global_weights, "the global weights"
    elif values:
        first = min(values)
        reference, name = values[first], f"worker {first}"
    else:
        return
    for wid in sorted(values):
        check_same_structure(reference, values[wid], wid, reference_name=name)


def first_nonfinite(weights: Sequence[torch.Tensor]) -> int | None:
    """Index of the first floating tensor holding NaN or Inf, or None.

    Fast path: NaN and Inf propagate through a sum, so a finite sum proves every element
    finite. ``isfinite(t).all()`` allocates a mask and costs ~20x more (190 ms vs 9 ms per
    100 MB); it only runs when the sum is not finite (a real NaN/Inf, or a sum that overflowed).
    """
    for p_idx, t in enumerate(weights):
        if not torch.is_floating_point(t) or bool(torch.isfinite(t.sum())):
            continue
        if not bool(torch.isfinite(t).all()):
            return p_idx
    return None
