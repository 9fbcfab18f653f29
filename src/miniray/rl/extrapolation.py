"""Weight extrapolation (``async_training.weight_extrapolation``): what a publish sends.

With factor c > 0 a publish sends ``theta + c * (theta - theta_before)``, theta the weights as
trained now and theta_before as trained at the previous publish: Adam's momentum makes
consecutive updates point much the same way, so one step further along the last one is closer
to the weights the samples will be trained at (SpecTrain's weight prediction for pipeline
staleness; docs/rl.md, "Staleness").

``Extrapolator`` keeps theta_before between publishes. It lives where the weights are: in the
trainer rank that answers the publish (``FullyAsyncTrainer.publishable_weights``), so the
driver passes the rank's answer on as it is; a trainer that cannot extrapolate itself gets
it in the driver (``weight_publisher.PublishedWeights``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["Extrapolator", "extrapolate"]


def extrapolate(
    weights: dict[str, torch.Tensor],
    earlier: dict[str, torch.Tensor] | None,
    factor: float,
) -> dict[str, torch.Tensor]:
    """``weights + factor * (weights - earlier)`` for floating-point entries (others as they
    are); ``weights`` itself when there is nothing to extrapolate from or ``factor`` is 0.
    Entries that share a tensor (tied embeddings) still share one in the result."""
    if not factor or earlier is None:
        return weights
    before = earlier
    return _once_per_tensor(
        weights,
        lambda name, value: (
            torch.lerp(before[name], value, 1.0 + factor) if value.is_floating_point() else value
        ),
    )


class Extrapolator:
    """The weights to publish, extrapolated along the step since the last publish."""

    def __init__(self) -> None:
        self._before: dict[str, torch.Tensor] | None = None  # as trained at the last publish

    def publish(
        self, trained: dict[str, torch.Tensor], factor: float, *, keep_copy: bool
    ) -> dict[str, torch.Tensor]:
        """``extrapolate(trained, before, factor)``; ``trained`` becomes ``before``.
        ``keep_copy``: ``trained`` are live tensors the next step changes, so a copy is kept
        (into the last one's buffers: no allocation per publish); else they are kept as given
        (a copy nobody writes into)."""
        out = extrapolate(trained, self._before, factor)
        self._before = _copy_into(self._before, trained) if keep_copy else trained
        return out

    def reset(self) -> None:
        """Weights replaced (a checkpoint restored): the next publish has nothing to
        extrapolate from and sends the weights as they are."""
        self._before = None


def _copy_into(
    buffers: dict[str, torch.Tensor] | None, state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """A copy of ``state`` (tied entries still one tensor), written into ``buffers`` when they
    have its names, shapes and dtypes."""
    kept = buffers if buffers is not None and buffers.keys() == state.keys() else {}

    def copy(name: str, tensor: torch.Tensor) -> torch.Tensor:
        old = kept.get(name)
        if old is not None and old.shape == tensor.shape and old.dtype == tensor.dtype:
            return old.copy_(tensor.detach())
        return tensor.detach().clone()

    return _once_per_tensor(state, copy)


def _once_per_tensor(
    state: dict[str, torch.Tensor], make: Callable[[str, torch.Tensor], torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``{name: make(name, tensor)}``, ``make`` called once per tensor: names that share one
    (tied entries) share the result."""
    out: dict[str, torch.Tensor] = {}
    made: dict[int, torch.Tensor] = {}
    for name, tensor in state.items():
        if id(tensor) not in made:
            made[id(tensor)] = make(name, tensor)
        out[name] = made[id(tensor)]
    return out
