"""Distillation losses against direct computations with explicit probabilities."""

from __future__ import annotations

import math

import pytest
import torch

from miniray.rl.distill.losses import (
    distillation_loss,
    divergence,
    forward_kl,
    generalized_jsd,
    is_on_policy,
    on_policy_schedule,
    restrict_to_topk,
    reverse_kl,
)

P = [0.7, 0.2, 0.1]  # teacher
Q = [0.3, 0.3, 0.4]  # student


def _logp(probs):
    return torch.tensor([math.log(p) for p in probs], dtype=torch.float64)


def _kl(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)


def _jsd(p, q, beta):
    m = [beta * x + (1 - beta) * y for x, y in zip(p, q)]
    return beta * _kl(p, m) + (1 - beta) * _kl(q, m)


def test_forward_and_reverse_kl_match_explicit_sums():
    s, t = _logp(Q), _logp(P)
    assert forward_kl(s, t).item() == pytest.approx(_kl(P, Q), rel=1e-6)
    assert reverse_kl(s, t).item() == pytest.approx(_kl(Q, P), rel=1e-6)
    assert forward_kl(s, t).item() != pytest.approx(reverse_kl(s, t).item(), rel=1e-3)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_matches_explicit_mixture_formula(beta):
    value = generalized_jsd(_logp(Q), _logp(P), beta).item()
    assert value == pytest.approx(_jsd(P, Q, beta), rel=1e-6)
    if beta != 0.5:  # swapped mixture weights (TRL PR #3043's bug) give another value
        assert value != pytest.approx(_jsd(P, Q, 1 - beta), rel=1e-3)


def test_jsd_endpoints_are_forward_and_reverse_kl():
    s, t = _logp(Q), _logp(P)
    assert generalized_jsd(s, t, 0.0).item() == pytest.approx(_kl(P, Q), rel=1e-6)
    assert generalized_jsd(s, t, 1.0).item() == pytest.approx(_kl(Q, P), rel=1e-6)


def test_jsd_tends_to_forward_kl_near_0_and_reverse_kl_near_1():
    s, t = _logp(Q), _logp(P)
    s64, t64 = s.double(), t.double()
    for eps in (1e-3, 1e-5):
        near0 = generalized_jsd(s64, t64, eps).item() / eps
        near1 = generalized_jsd(s64, t64, 1 - eps).item() / eps
        assert near0 == pytest.approx(_kl(P, Q), rel=10 * eps)
        assert near1 == pytest.approx(_kl(Q, P), rel=10 * eps)


def test_divergences_are_zero_for_equal_distributions_and_reject_bad_input():
    s = _logp(P)
    for name in ("forward_kl", "reverse_kl", "jsd"):
        assert divergence(s, s.clone(), loss=name).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="loss='kl' is unknown"):
        divergence(s, s, loss="kl")
    with pytest.raises(ValueError, match=r"beta=1.5 is invalid: must be in \[0, 1\]"):
        generalized_jsd(s, s, 1.5)
    with pytest.raises(ValueError, match="same shape"):
        forward_kl(s, s[:2])


def test_teacher_minus_inf_gives_no_nan():
    s = torch.log_softmax(torch.randn(4), -1).requires_grad_()
    t = torch.tensor([0.0, -math.inf, -math.inf, -math.inf])
    value = forward_kl(s, t) + generalized_jsd(s, t, 0.5)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(s.grad).all()


def _batch(seed=0, b=2, t=5, v=7):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(b, t, v, generator=g)
    teacher = torch.log_softmax(torch.randn(b, t, v, generator=g) * 2, -1)
    return student, teacher


def test_loss_counts_only_masked_tokens_and_averages_over_them():
    student, teacher = _batch()
    mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]])
    out = distillation_loss(student, mask, teacher_logprobs=teacher, loss="reverse_kl")
    per_token = reverse_kl(torch.log_softmax(student, -1), teacher)
    expected = per_token[mask.bool()].mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert out.num_tokens == 6
    # Changing the logits of a prompt/padding position changes nothing.
    changed = student.clone()
    changed[0, 0] += 5
    changed[0, 4] -= 3
    again = distillation_loss(changed, mask, teacher_logprobs=teacher, loss="reverse_kl")
    assert again.loss.item() == pytest.approx(out.loss.item(), rel=1e-6)
    empty = distillation_loss(student, torch.zeros_like(mask), teacher_logprobs=teacher)
    assert empty.loss.item() == 0.0 and empty.num_tokens == 0


def test_temperature_scales_student_logits_and_teacher_logprobs():
    student, teacher = _batch(1)
    mask = torch.ones(student.shape[:2])
    temp = 2.0
    out = distillation_loss(
        student, mask, teacher_logprobs=teacher, loss="forward_kl", temperature=temp
    )
    s = torch.log_softmax(student / temp, -1)
    t = torch.log_softmax(teacher / temp, -1)  # teacher logits z: softmax(z / T) == this
    expected = (t.exp() * (t - s)).sum(-1).mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    plain = distillation_loss(student, mask, teacher_logprobs=teacher, loss="forward_kl")
    assert plain.loss.item() != pytest.approx(out.loss.item(), rel=1e-3)
    with pytest.raises(ValueError, match="temperature=0 is invalid"):
        distillation_loss(student, mask, teacher_logprobs=teacher, temperature=0)


def test_topk_with_full_vocabulary_equals_the_full_loss():
    student, teacher = _batch(2)
    mask = torch.ones(student.shape[:2])
    top_logp, top_idx = teacher.topk(teacher.shape[-1], dim=-1)
    for name in ("forward_kl", "reverse_kl", "jsd"):
        full = distillation_loss(student, mask, teacher_logprobs=teacher, loss=name, beta=0.3)
        topk = distillation_loss(
            student,
            mask,
            teacher_topk_logprobs=top_logp,
            teacher_topk_indices=top_idx,
            loss=name,
            beta=0.3,
        )
        assert topk.loss.item() == pytest.approx(full.loss.item(), rel=1e-5)
        assert topk.teacher_topk_mass == pytest.approx(1.0, rel=1e-5)


def test_topk_renormalises_both_sides_on_the_support():
    student, teacher = _batch(3, b=1, t=1, v=6)
    top_logp, top_idx = teacher.topk(2, dim=-1)
    s, t = restrict_to_topk(student, top_logp, top_idx)
    probs_s = torch.softmax(student[0, 0], -1)[top_idx[0, 0]]
    probs_t = teacher[0, 0].exp()[top_idx[0, 0]]
    assert s.exp()[0, 0].tolist() == pytest.approx((probs_s / probs_s.sum()).tolist(), rel=1e-5)
    assert t.exp()[0, 0].tolist() == pytest.approx((probs_t / probs_t.sum()).tolist(), rel=1e-5)
    out = distillation_loss(
        student, torch.ones(1, 1), teacher_topk_logprobs=top_logp, teacher_topk_indices=top_idx
    )
    assert out.teacher_topk_mass == pytest.approx(probs_t.sum().item(), rel=1e-5)
    assert 0 < out.student_topk_mass < 1
    with pytest.raises(ValueError, match="must be in \\[0, 6\\)"):
        restrict_to_topk(student, top_logp, top_idx + 10)


def test_gradient_descent_on_the_loss_moves_the_student_to_the_teacher():
    student, teacher = _batch(4)
    logits = student.clone().requires_grad_()
    mask = torch.ones(student.shape[:2])
    opt = torch.optim.Adam([logits], lr=0.1)
    first = reverse_kl(torch.log_softmax(student, -1), teacher).mean().item()
    for _ in range(200):
        out = distillation_loss(logits, mask, teacher_logprobs=teacher, loss="jsd", beta=0.5)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    final = reverse_kl(torch.log_softmax(logits.detach(), -1), teacher).mean().item()
    assert final < 0.02 * first


def test_loss_rejects_ambiguous_or_mismatched_teachers():
    student, teacher = _batch()
    mask = torch.ones(student.shape[:2])
    with pytest.raises(ValueError, match="exactly one of"):
        distillation_loss(student, mask)
    top_logp, top_idx = teacher.topk(2, -1)
    with pytest.raises(ValueError, match="exactly one of"):
        distillation_loss(
            student,
            mask,
            teacher_logprobs=teacher,
            teacher_topk_logprobs=top_logp,
            teacher_topk_indices=top_idx,
        )
    with pytest.raises(ValueError, match="mask of shape"):
        distillation_loss(student, mask[:, :2], teacher_logprobs=teacher)


def test_lmbda_rule_is_seeded_and_independent_of_call_order():
    first = on_policy_schedule(0.5, seed=7, num_batches=64)
    assert first == on_policy_schedule(0.5, seed=7, num_batches=64)
    assert first != on_policy_schedule(0.5, seed=8, num_batches=64)
    backwards = [is_on_policy(0.5, seed=7, batch_index=i) for i in reversed(range(64))]
    assert backwards[::-1] == first
    assert not any(on_policy_schedule(0.0, seed=1, num_batches=500))
    assert all(on_policy_schedule(1.0, seed=1, num_batches=500))
    with pytest.raises(ValueError, match=r"lmbda=1\.2 is invalid"):
        is_on_policy(1.2, seed=0, batch_index=0)


@pytest.mark.parametrize("lmbda", [0.1, 0.5, 0.8])
def test_lmbda_is_the_fraction_of_on_policy_batches(lmbda):
    n = 4000
    fraction = sum(on_policy_schedule(lmbda, seed=3, num_batches=n)) / n
    sd = math.sqrt(lmbda * (1 - lmbda) / n)
    assert abs(fraction - lmbda) < 4 * sd
