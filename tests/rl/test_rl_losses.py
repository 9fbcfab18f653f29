"""Loss functions: log-probs, GRPO advantages, decoupled PPO with behaviour importance weights."""

from __future__ import annotations

import math

import pytest
import torch

from miniray.rl.losses import (
    aggregate_loss,
    entropy_from_logits,
    grpo_advantages,
    logprobs_from_logits,
    masked_mean,
    ppo_loss,
    token_advantages,
)


def test_logprobs_and_entropy_from_logits():
    logits = torch.tensor([[[0.0, math.log(3.0)]]])  # p = [0.25, 0.75]
    assert logprobs_from_logits(logits, torch.tensor([[1]])).item() == pytest.approx(math.log(0.75))
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert entropy_from_logits(logits).item() == pytest.approx(h)
    with pytest.raises(ValueError, match="do not match"):
        logprobs_from_logits(logits, torch.tensor([1]))


def test_masked_mean_ignores_padding_and_never_divides_by_zero():
    values = torch.tensor([[1.0, 100.0], [3.0, 5.0]])
    mask = torch.tensor([[1, 0], [1, 1]])
    assert masked_mean(values, mask).item() == pytest.approx(3.0)
    assert masked_mean(values, mask, dim=-1).tolist() == [1.0, 4.0]
    assert masked_mean(values, torch.zeros(2, 2)).item() == 0.0


def test_grpo_advantages_are_group_relative():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.7, 0.7])
    groups = torch.tensor([0, 0, 0, 0, 1, 2, 2])
    adv = grpo_advantages(rewards, groups)
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std().item()
    expected = [0.5 / std, -0.5 / std, -0.5 / std, 0.5 / std]
    assert adv[:4].tolist() == pytest.approx(expected, rel=1e-4)
    assert adv[4].item() == 0.0  # a group of one has no baseline
    assert adv[5:].tolist() == [0.0, 0.0]  # equal rewards carry no signal
    raw = grpo_advantages(rewards, groups, norm_by_std=False)
    assert raw[:4].tolist() == [0.5, -0.5, -0.5, 0.5]
    with pytest.raises(ValueError, match="1-D of the same length"):
        grpo_advantages(rewards, groups[:3])


def test_token_advantages_spread_over_the_response():
    out = token_advantages(torch.tensor([2.0, -1.0]), torch.tensor([[1, 1, 0], [1, 0, 0]]))
    assert out.tolist() == [[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]


def test_aggregation_modes():
    loss = torch.tensor([[1.0, 1.0, 1.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert aggregate_loss(loss, mask, "token-mean").item() == pytest.approx(7 / 4)
    assert aggregate_loss(loss, mask, "seq-mean-token-mean").item() == pytest.approx(2.5)
    assert aggregate_loss(loss, mask, "seq-mean-token-sum").item() == pytest.approx(3.5)
    with pytest.raises(ValueError, match="loss_agg_mode='sum' is unknown"):
        aggregate_loss(loss, mask, "sum")


def _case(ratio=1.0, adv=1.0):
    logprobs = torch.full((1, 2), math.log(ratio), requires_grad=True)
    prox = torch.zeros(1, 2)
    return logprobs, prox, torch.full((1, 2), adv), torch.ones(1, 2)


def test_on_policy_ppo_is_minus_the_mean_advantage_with_its_gradient():
    logprobs, prox, adv, mask = _case()
    adv = torch.tensor([[1.0, -3.0]])
    loss, metrics = ppo_loss(logprobs, prox, adv, mask)
    assert loss.item() == pytest.approx(1.0)  # -(1 - 3) / 2
    loss.backward()
    assert logprobs.grad[0].tolist() == pytest.approx([-0.5, 1.5])
    assert metrics["clip_fraction"] == 0.0 and metrics["approx_kl"] == pytest.approx(0.0)


def test_clipping_stops_the_gradient_beyond_the_trust_region():
    logprobs, prox, adv, mask = _case(ratio=2.0, adv=1.0)
    loss, metrics = ppo_loss(logprobs, prox, adv, mask, clip_ratio_low=0.2)
    assert loss.item() == pytest.approx(-1.2)
    loss.backward()
    assert logprobs.grad.abs().sum().item() == 0.0
    assert metrics["clip_fraction"] == 1.0
    # Clip-higher: a wider upper bound lets the ratio go further.
    logprobs, prox, adv, mask = _case(ratio=2.0, adv=1.0)
    loss, _ = ppo_loss(logprobs, prox, adv, mask, clip_ratio_low=0.2, clip_ratio_high=0.5)
    assert loss.item() == pytest.approx(-1.5)
    # With a negative advantage the pessimistic bound uses the unclipped ratio.
    logprobs, prox, adv, mask = _case(ratio=2.0, adv=-1.0)
    loss, _ = ppo_loss(logprobs, prox, adv, mask)
    assert loss.item() == pytest.approx(2.0)


def test_behaviour_importance_weights_correct_off_policy_tokens():
    logprobs, prox, adv, mask = _case()
    # pi_prox / pi_behave = 2 on the first token, 0.5 on the second.
    behaviour = torch.tensor([[math.log(0.5), math.log(2.0)]])
    loss, metrics = ppo_loss(logprobs, prox, adv, mask, behaviour_logprobs=behaviour)
    assert loss.item() == pytest.approx(-(2.0 + 0.5) / 2)
    assert metrics["behaviour_weight_mean"] == pytest.approx(1.25)
    assert metrics["behaviour_filtered_fraction"] == 0.0
    # Equal behaviour and proximal log-probs: exactly plain PPO.
    plain, _ = ppo_loss(logprobs, prox, adv, mask)
    same, _ = ppo_loss(logprobs, prox, adv, mask, behaviour_logprobs=prox.clone())
    assert same.item() == pytest.approx(plain.item())


def test_weights_above_the_cap_are_masked_or_clamped():
    logprobs, prox, adv, mask = _case()
    behaviour = torch.tensor([[math.log(0.1), 0.0]])  # weights 10 and 1
    masked, metrics = ppo_loss(
        logprobs, prox, adv, mask, behaviour_logprobs=behaviour, behaviour_weight_cap=5.0
    )
    assert masked.item() == pytest.approx(-(0.0 + 1.0) / 2)
    assert metrics["behaviour_filtered_fraction"] == 0.5
    clamped, _ = ppo_loss(
        logprobs,
        prox,
        adv,
        mask,
        behaviour_logprobs=behaviour,
        behaviour_weight_cap=5.0,
        behaviour_weight_mode="clamp",
    )
    assert clamped.item() == pytest.approx(-(5.0 + 1.0) / 2)
    uncapped, _ = ppo_loss(
        logprobs, prox, adv, mask, behaviour_logprobs=behaviour, behaviour_weight_cap=None
    )
    assert uncapped.item() == pytest.approx(-(10.0 + 1.0) / 2)


def test_prefix_and_sequence_weights_multiply_the_ratios_over_the_response():
    logprobs = torch.zeros(1, 3)
    prox = torch.zeros(1, 3)
    adv = torch.ones(1, 3)
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the third position is padding
    behaviour = torch.tensor([[math.log(0.5), math.log(0.5), math.log(8.0)]])  # ratios 2, 2

    def loss_at(level: str) -> float:
        loss, _ = ppo_loss(
            logprobs,
            prox,
            adv,
            mask,
            behaviour_logprobs=behaviour,
            behaviour_weight_level=level,
            behaviour_weight_cap=None,
        )
        return loss.item()

    assert loss_at("token") == pytest.approx(-(2.0 + 2.0) / 2)
    assert loss_at("prefix") == pytest.approx(-(2.0 + 4.0) / 2)
    assert loss_at("sequence") == pytest.approx(-(4.0 + 4.0) / 2)
    with pytest.raises(ValueError, match="behaviour_weight_level='tokens'"):
        loss_at("tokens")


def _two_token_policy(logits: torch.Tensor) -> torch.Tensor:
    """Log-probs (4, 2) of the four two-token responses over a vocabulary {0, 1}: the first
    token from ``logits[0]``, the second from ``logits[1 + first]``."""
    first = torch.log_softmax(logits[0], -1)
    second = torch.log_softmax(logits[1:], -1)
    rows = [torch.stack([first[a], second[a, b]]) for a in (0, 1) for b in (0, 1)]
    return torch.stack(rows)


@pytest.mark.parametrize("level", ["token", "prefix", "sequence"])
def test_only_sequence_weights_recover_the_on_policy_gradient(level):
    # Exact enumeration of a two-token process whose reward is for the whole response: the
    # expected update from behaviour samples, against the gradient of the current policy's
    # expected reward. Weighting each response by b(response) turns the loss's mean over the
    # four responses into the expectation under the behaviour policy.
    torch.manual_seed(0)
    theta = torch.randn(3, 2, requires_grad=True)
    behaviour_logits = theta.detach() + 1.5 * torch.randn(3, 2)
    reward = torch.tensor([1.0, 0.0, 0.2, 0.7])
    with torch.no_grad():
        behaviour = _two_token_policy(behaviour_logits)
    logprobs = _two_token_policy(theta)
    b = behaviour.sum(-1).exp()
    adv = (4 * b * reward)[:, None].expand(4, 2)
    loss, _ = ppo_loss(
        logprobs,
        logprobs.detach(),
        adv,
        torch.ones(4, 2),
        behaviour_logprobs=behaviour,
        behaviour_weight_level=level,
        behaviour_weight_cap=None,
        loss_agg_mode="seq-mean-token-sum",
    )
    (estimated,) = torch.autograd.grad(-loss, theta)
    expected_reward = (_two_token_policy(theta).sum(-1).exp() * reward).sum()
    (on_policy,) = torch.autograd.grad(expected_reward, theta)
    if level == "sequence":
        torch.testing.assert_close(estimated, on_policy)
    else:
        # The token and prefix levels judge tokens by how the behaviour policy would go on.
        assert (estimated - on_policy).abs().max() > 0.1 * on_policy.abs().max()


def test_padding_never_changes_the_loss():
    logprobs = torch.tensor([[0.1, 5.0]], requires_grad=True)
    prox = torch.zeros(1, 2)
    adv = torch.tensor([[1.0, 100.0]])
    mask = torch.tensor([[1.0, 0.0]])
    behaviour = torch.tensor([[0.0, -50.0]])
    loss, _ = ppo_loss(logprobs, prox, adv, mask, behaviour_logprobs=behaviour)
    assert loss.item() == pytest.approx(-min(math.exp(0.1), 1.2))
    loss.backward()
    assert logprobs.grad[0, 1].item() == 0.0


def test_bad_inputs_name_the_argument():
    logprobs, prox, adv, mask = _case()
    with pytest.raises(ValueError, match="advantages has shape"):
        ppo_loss(logprobs, prox, adv[:, :1], mask)
    with pytest.raises(ValueError, match=r"clip_ratio_low=1\.0"):
        ppo_loss(logprobs, prox, adv, mask, clip_ratio_low=1.0)
    with pytest.raises(ValueError, match=r"behaviour_weight_cap=0\.5"):
        ppo_loss(logprobs, prox, adv, mask, behaviour_logprobs=prox, behaviour_weight_cap=0.5)


def test_kl_estimators_match_the_exact_kl_on_samples_of_the_policy():
    from miniray.rl.losses import kl_penalty

    gen = torch.Generator().manual_seed(0)
    policy = torch.log_softmax(torch.randn(6, generator=gen) * 0.5, dim=0)
    ref = torch.log_softmax(torch.randn(6, generator=gen) * 0.5, dim=0)
    exact = float((policy.exp() * (policy - ref)).sum())
    tokens = torch.multinomial(policy.exp(), 200_000, replacement=True, generator=gen)
    logp, ref_logp = policy[tokens].reshape(400, 500), ref[tokens].reshape(400, 500)
    for kind in ("k1", "k3", "low_var_kl"):  # unbiased
        assert float(kl_penalty(logp, ref_logp, kind).mean()) == pytest.approx(exact, rel=0.05)
    # k2 is biased but close for nearby distributions, and k3 is never negative
    assert float(kl_penalty(logp, ref_logp, "k2").mean()) == pytest.approx(exact, rel=0.3)
    assert float(kl_penalty(logp, ref_logp, "k3").min()) >= 0.0
    assert float(kl_penalty(logp, ref_logp, "k1").min()) < 0.0


def test_kl_is_zero_against_itself_and_low_var_kl_is_bounded():
    from miniray.rl.losses import kl_penalty

    logp = torch.tensor([[-1.0, -0.5, -3.0]])
    for kind in ("k1", "k2", "k3", "low_var_kl"):
        assert torch.equal(kl_penalty(logp, logp, kind), torch.zeros_like(logp))
    far = torch.tensor([[60.0, -60.0]])
    assert float(kl_penalty(torch.zeros_like(far), far, "low_var_kl").max()) == 10.0
    assert float(kl_penalty(torch.zeros_like(far), far, "k3").max()) > 1e20  # unclamped


def test_an_unknown_kl_type_names_the_key_and_the_choices():
    from miniray.rl.losses import kl_penalty

    with pytest.raises(ValueError, match=r"kl_loss_type='mse'.*low_var_kl"):
        kl_penalty(torch.zeros(1, 2), torch.zeros(1, 2), "mse")
