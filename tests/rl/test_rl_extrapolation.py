"""Extrapolator: what a publish sends with ``async_training.weight_extrapolation``."""

from __future__ import annotations

import torch

from miniray.rl.extrapolation import Extrapolator


def live_weights(value: float) -> dict[str, torch.Tensor]:
    embed = torch.full((2, 3), value)
    return {
        "embed": embed,
        "lm_head": embed,
        "bias": torch.full((3,), -value),
        "steps": torch.tensor([7]),
    }


def test_each_publish_extrapolates_along_the_step_since_the_last_one():
    extrapolator, live = Extrapolator(), live_weights(1.0)
    first = extrapolator.publish(live, 0.5, keep_copy=True)
    assert first is live  # nothing to extrapolate from yet: the weights as they are
    for name in ("embed", "bias", "steps"):  # the next step changes them in place
        live[name].mul_(3)  # embed (and the tied lm_head) 3, bias -3, steps 21
    second = extrapolator.publish(live, 0.5, keep_copy=True)
    # 3 + 0.5 * (3 - 1) = 4 from the copy kept at the last publish, not the live tensors.
    assert torch.equal(second["embed"], torch.full((2, 3), 4.0))
    assert torch.equal(second["bias"], torch.full((3,), -4.0))
    assert second["lm_head"] is second["embed"]  # tied entries stay one tensor
    assert torch.equal(second["steps"], torch.tensor([21]))  # integers are not moved
    assert all(second[k] is not live[k] for k in ("embed", "bias"))


def test_the_kept_copy_reuses_its_buffers_and_keeps_ties():
    extrapolator, live = Extrapolator(), live_weights(1.0)
    extrapolator.publish(live, 1.0, keep_copy=True)
    kept = extrapolator._before
    assert kept is not None and kept["embed"] is kept["lm_head"]
    assert kept["embed"].data_ptr() != live["embed"].data_ptr()
    pointer = kept["embed"].data_ptr()
    live["embed"].add_(1)
    out = extrapolator.publish(live, 1.0, keep_copy=True)
    assert torch.equal(out["embed"], torch.full((2, 3), 3.0))  # 2 + 1 * (2 - 1)
    assert extrapolator._before["embed"].data_ptr() == pointer  # copied into, not allocated
    assert torch.equal(extrapolator._before["embed"], torch.full((2, 3), 2.0))


def test_reset_and_a_zero_factor_send_the_weights_as_they_are():
    extrapolator = Extrapolator()
    extrapolator.publish(live_weights(1.0), 1.0, keep_copy=True)
    extrapolator.reset()
    again = live_weights(5.0)
    assert extrapolator.publish(again, 1.0, keep_copy=True) is again
    assert extrapolator.publish(live_weights(2.0), 0.0, keep_copy=False)["bias"][0] == -2.0
