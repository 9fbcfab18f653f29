"""The outer optimizer: SGD with (Nesterov) momentum applied to a pseudo-gradient.

Sign convention, pinned by tests: the pseudo-gradient is ``delta = global - target`` (what to
*subtract*), exactly like a gradient, so ``new = global - lr * delta``. With lr=1 and no momentum
this lands on the target (plain averaging); EMA with factor b is lr = 1 - b; DiLoCo is
lr=0.7, momentum=0.9, nesterov=True, whose first step is 1.33 * delta. torchft once shipped this
sign inverted, which silently trains away from the workers.

The update matches ``torch.optim.SGD`` step for step (a test checks it), but it is written out
here so that its only state, the momentum buffers, is a plain tensor list we can checkpoint.
"""

from __future__ import annotations

import math

import torch

from miniray.ps.reducers import accumulation_dtype


class OuterSGD:
    """``new = global - lr * d`` where d is delta, or its (Nesterov) momentum-smoothed version."""

    def __init__(self, *, lr: float, momentum: float = 0.0, nesterov: bool = False):
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"outer optimizer: lr={lr!r} must be a finite number > 0")
        if not (isinstance(momentum, (int, float)) and 0 <= momentum < 1):
            raise ValueError(f"outer optimizer: momentum={momentum!r} must be in [0, 1)")
        if nesterov and momentum == 0:
            raise ValueError("outer optimizer: nesterov=True needs momentum > 0")
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)
        # Buffers by parameter index, created on the first step like torch.optim.SGD's.
        self.buffers: dict[int, torch.Tensor] = {}

    def step(
        self, global_weights: list[torch.Tensor], deltas: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """New weights; non-floating entries of ``deltas`` are ignored (global kept)."""
        out = []
        for i, (g, d) in enumerate(zip(global_weights, deltas)):
            if not torch.is_floating_point(g):
                out.append(g.clone())
                continue
            acc = accumulation_dtype(g.dtype)
            d = d.to(acc)
            if self.momentum:
                buf = self.buffers.get(i)
                if buf is None:
                    buf = d.clone()
                else:
                    buf.mul_(self.momentum).add_(d)
                self.buffers[i] = buf
                d = d + self.momentum * buf if self.nesterov else buf
            out.append((g.to(acc) - self.lr * d).to(g.dtype))
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"momentum_buffer.{i}": b for i, b in self.buffers.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        prefix = "momentum_buffer."
        self.buffers = {
            int(k[len(prefix) :]): v.clone() for k, v in state.items() if k.startswith(prefix)
        }
