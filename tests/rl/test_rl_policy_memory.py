"""Bounded memory in the update: chunked log-probs and entropy equal the plain computation,
micro-batches and rank shares add up to the whole minibatch, padding is trimmed losslessly."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from miniray.rl.losses import (
    aggregate_loss,
    entropy_from_logits,
    logprobs_from_logits,
    loss_denominator,
    token_logprobs,
)
from miniray.rl.models import char_tokenizer, tiny_qwen2
from miniray.rl.policy import (
    PolicyUpdateConfig,
    PolicyUpdater,
    micro_batches,
    response_logits,
    shard_rows,
)
from miniray.rl.types import Sample, collate


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer("0123456789+-=")


def random_samples(tokenizer, *, groups=3, per_group=4, seed=0):
    """Groups with prompts and responses of different lengths, mixed rewards and recorded
    log-probs a little off the policy's (so the behaviour correction is exercised)."""
    rng = random.Random(seed)
    samples = []
    vocab = len(tokenizer) - 3
    for g in range(groups):
        prompt = [tokenizer.bos_token_id] + [3 + rng.randrange(vocab) for _ in range(2 + g)]
        for i in range(per_group):
            length = 1 + rng.randrange(6)
            response = [3 + rng.randrange(vocab) for _ in range(length)]
            samples.append(
                Sample(
                    prompt_token_ids=prompt,
                    response_token_ids=response,
                    response_logprobs=[-2.5 + 0.1 * rng.random() for _ in response],
                    reward=float((i + g) % 2),
                    group_id=f"g{g}",
                    v_start=0,
                )
            )
    return samples


@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_logprobs_and_entropy_equal_the_plain_computation(with_entropy, temperature):
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 11, (3, 5))
    weights_lp, weights_h = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5)
    # 22 elements a chunk: two rows of the vocabulary, eight chunks over 15 positions.
    logp, entropy = token_logprobs(
        logits, tokens, temperature=temperature, with_entropy=with_entropy, chunk_elements=22
    )
    plain_logp = logprobs_from_logits(logits / temperature, tokens)
    torch.testing.assert_close(logp, plain_logp.float(), atol=1e-5, rtol=0)
    objective = (logp.double() * weights_lp).sum()
    plain_objective = (plain_logp * weights_lp).sum()
    if with_entropy:
        plain_entropy = entropy_from_logits(logits / temperature)
        assert entropy is not None
        torch.testing.assert_close(entropy, plain_entropy.float(), atol=1e-5, rtol=0)
        objective = objective + (entropy.double() * weights_h).sum()
        plain_objective = plain_objective + (plain_entropy * weights_h).sum()
    else:
        assert entropy is None
    (grad,) = torch.autograd.grad(objective, logits)
    (plain_grad,) = torch.autograd.grad(plain_objective, logits)
    torch.testing.assert_close(grad, plain_grad, atol=1e-5, rtol=1e-5)


def test_chunked_logprobs_keep_the_gradient_in_the_logits_dtype_and_accept_bf16():
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 64).bfloat16().requires_grad_()
    tokens = torch.randint(0, 64, (2, 4))
    logp, _ = token_logprobs(logits, tokens, chunk_elements=64)
    assert logp.dtype == torch.float32
    logp.sum().backward()
    assert logits.grad is not None and logits.grad.dtype == torch.bfloat16
    plain = logprobs_from_logits(logits.detach().float(), tokens)
    torch.testing.assert_close(logp.detach(), plain, atol=1e-5, rtol=0)


def test_chunked_logprobs_refuse_bad_input():
    with pytest.raises(ValueError, match="do not match tokens"):
        token_logprobs(torch.zeros(2, 3, 4), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature=0"):
        token_logprobs(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), temperature=0)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_loss_shares_with_the_minibatch_denominator_add_up_to_the_whole(mode):
    torch.manual_seed(2)
    loss = torch.randn(6, 5)
    mask = (torch.rand(6, 5) > 0.3).float()
    mask[:, 0] = 1
    whole = aggregate_loss(loss, mask, mode)
    denominator = loss_denominator(mask, mode)
    parts = sum(
        aggregate_loss(loss[rows], mask[rows], mode, denominator=denominator)
        for rows in (slice(0, 1), slice(1, 4), slice(4, 6))
    )
    torch.testing.assert_close(parts, whole)


def test_rank_shares_and_micro_batches_pair_up_across_ranks():
    rows = torch.arange(10, 15)  # 5 rows over 2 ranks: shares of 3 and 2
    assert shard_rows(rows, 0, 2).tolist() == [10, 11, 12]
    assert shard_rows(rows, 1, 2).tolist() == [13, 14]
    plans = [micro_batches(rows, rank=r, world_size=2, micro_batch_size=1) for r in (0, 1)]
    assert [len(p) for p in plans] == [3, 3]  # the same number of forwards on every rank
    assert [m.weight for m in plans[1]] == [1, 1, 0]  # the short rank runs one stand-in
    trained = [int(i) for p in plans for m in p if m.weight for i in m.rows]
    assert sorted(trained) == rows.tolist()  # every row once
    # Fewer rows than ranks: a rank with none still runs (a stand-in) and trains nothing.
    (only,) = micro_batches(torch.arange(1), rank=1, world_size=2, micro_batch_size=None)
    assert only.weight == 0


def test_trimmed_batch_drops_only_padding_every_row_has(tokenizer):
    model = tiny_qwen2(tokenizer, hidden_size=32, intermediate_size=64, seed=5)
    samples = random_samples(tokenizer)
    batch = collate(samples, pad_token_id=tokenizer.pad_token_id)
    part = batch.select(torch.tensor([0, 1])).trimmed()
    assert part.input_ids.shape[1] < batch.input_ids.shape[1]
    width = part.response_mask.shape[1]
    with torch.no_grad():
        full = response_logits(model, batch.select(torch.tensor([0, 1])))
        trimmed = response_logits(model, part)
    mask = part.response_mask.bool()
    torch.testing.assert_close(trimmed[mask], full[:, :width][mask], atol=1e-5, rtol=0)


def test_logits_to_keep_gives_the_full_forward_s_response_logits(tokenizer):
    model = tiny_qwen2(tokenizer, hidden_size=32, intermediate_size=64, seed=6)
    batch = collate(random_samples(tokenizer), pad_token_id=tokenizer.pad_token_id)
    positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=positions
        ).logits[:, batch.prompt_length - 1 : -1]
        kept = response_logits(model, batch)
    assert kept.shape == full.shape
    torch.testing.assert_close(kept, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"loss_agg_mode": "seq-mean-token-mean", "entropy_coeff": 0.01},
        {"ppo_mini_batch_size": 6, "ppo_epochs": 2, "loss_agg_mode": "seq-mean-token-sum"},
        {"use_kl_loss": True, "kl_loss_coef": 0.1},
    ],
    ids=["plain", "seq-mean-entropy", "minibatches-epochs", "kl"],
)
def test_micro_batches_take_the_step_of_the_whole_batch(tokenizer, options):
    torch.manual_seed(7)
    model = tiny_qwen2(tokenizer, hidden_size=32, intermediate_size=64, seed=7)
    samples = random_samples(tokenizer, seed=7)
    results = []
    for micro in (None, 1, 5):
        policy = copy.deepcopy(model)
        reference = copy.deepcopy(model) if options.get("use_kl_loss") else None
        # lr 1e-3: Adam turns round-off in near-zero gradients (a key bias gets none in exact
        # arithmetic: softmax ignores a shift of all scores) into steps of ~lr.
        config = PolicyUpdateConfig(lr=1e-3, ppo_micro_batch_size=micro, **options)
        updater = PolicyUpdater(
            policy, pad_token_id=tokenizer.pad_token_id, config=config, ref_model=reference
        )
        metrics = [updater.step(samples) for _ in range(2)]
        results.append((policy, metrics))
    (whole, whole_metrics), *others = results
    moved = any(
        not torch.equal(a, b)
        for a, b in zip(whole.state_dict().values(), model.state_dict().values())
    )
    assert moved  # the step did something, so equality below says something
    for policy, metrics in others:
        for (name, a), b in zip(whole.state_dict().items(), policy.state_dict().values()):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=name)
        assert metrics[-1]["loss"] == pytest.approx(whole_metrics[-1]["loss"], abs=1e-5)
        assert metrics[-1]["grad_norm"] == pytest.approx(whole_metrics[-1]["grad_norm"], rel=1e-4)


def test_micro_batch_size_below_one_is_refused():
    with pytest.raises(ValueError, match="ppo_micro_batch_size=0"):
        PolicyUpdateConfig(ppo_micro_batch_size=0)
