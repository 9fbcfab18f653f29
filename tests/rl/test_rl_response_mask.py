"""The response mask of a multi-turn sample: observation tokens get no loss, no entropy, no KL,
no behaviour weight, and do not count as generated; the model's tokens train as before."""

from __future__ import annotations

import pytest
import torch

from miniray.rl.engines import HFGenerationEngine
from miniray.rl.losses import aggregate_loss, kl_penalty, ppo_loss, token_logprobs
from miniray.rl.models import char_tokenizer, tiny_qwen2
from miniray.rl.policy import PolicyUpdateConfig, PolicyUpdater, response_logprobs
from miniray.rl.types import Sample, collate


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer("0123456789+-=*")


def conversation(tokenizer, turns, *, reward, placeholder=0.0):
    """A sample whose response alternates model turns and observations: ``turns`` is a list
    of (text, is_model)."""
    ids = lambda text: tokenizer(text)["input_ids"]  # noqa: E731
    sample = Sample(
        prompt_token_ids=[tokenizer.bos_token_id, *ids("12*34=")],
        response_token_ids=[],
        response_logprobs=[],
        v_start=0,
        group_id="g",
        reward=reward,
    )
    for text, is_model in turns:
        if is_model:
            tokens = ids(text)
            sample.append_tokens(tokens, [-1.5] * len(tokens), 0)
        else:
            sample.append_observation(ids(text))
            for i in range(len(sample.response_logprobs)):
                if sample.response_mask[i] == 0:
                    sample.response_logprobs[i] = placeholder
    return sample


TURNS_A = [("1*2", True), ("=408", False), ("408", True)]
TURNS_B = [("3*4", True), ("=12", False), ("12", True)]


def test_append_observation_masks_and_keeps_versions(tokenizer):
    sample = conversation(tokenizer, TURNS_A, reward=1.0)
    assert sample.response_mask == [1, 1, 1, 0, 0, 0, 0, 1, 1, 1]
    assert sample.num_response_tokens == 10 and sample.num_generated_tokens == 6
    assert sample.v_start == sample.v_end == 0
    sample.append_tokens(tokenizer("5")["input_ids"], [-0.1], 2)  # after a weight sync
    assert (sample.v_start, sample.v_end) == (0, 2) and sample.response_mask[-1] == 1
    with pytest.raises(ValueError, match="response_mask has 1 entries"):
        Sample(prompt_token_ids=[1], response_token_ids=[2, 3], v_start=0, response_mask=[1])
    with pytest.raises(ValueError, match="0 \\(observation\\) or"):
        Sample(prompt_token_ids=[1], response_token_ids=[2], v_start=0, response_mask=[2])


def test_collate_carries_the_mask_and_trimming_keeps_observation_columns(tokenizer):
    long = conversation(tokenizer, TURNS_A, reward=1.0)
    short = Sample(prompt_token_ids=[1, 5], response_token_ids=[6], v_start=0, reward=0.0)
    short.response_logprobs = [-0.5]
    batch = collate([long, short], pad_token_id=tokenizer.pad_token_id)
    assert batch.response_mask[0].tolist() == [float(m) for m in long.response_mask]
    assert batch.response_mask[1].tolist() == [1.0] + [0.0] * 9
    # Only the generated tokens count as the response length (observations do not).
    part = batch.select(torch.tensor([0])).trimmed()
    assert part.response_mask.shape[1] == 10  # the last model token is at column 10
    assert part.response_ids[0].tolist() == long.response_token_ids


@pytest.mark.parametrize("level", ["token", "prefix", "sequence"])
def test_masked_tokens_get_exactly_zero_gradient(tokenizer, level):
    """The whole per-token objective of an update (clipped PPO with behaviour weights,
    entropy bonus, KL to a reference) leaves the logits of observation columns untouched."""
    samples = [
        conversation(tokenizer, TURNS_A, reward=1.0, placeholder=0.0),
        conversation(tokenizer, TURNS_B, reward=0.0, placeholder=0.0),
    ]
    batch = collate(samples, pad_token_id=tokenizer.pad_token_id)
    mask = batch.response_mask
    torch.manual_seed(0)
    logits = torch.randn(*mask.shape, len(tokenizer), requires_grad=True)
    logp, entropy = token_logprobs(logits, batch.response_ids, with_entropy=True)
    prox = logp.detach() + 0.05 * torch.randn_like(logp)
    advantages = torch.tensor([[1.0], [-1.0]]) * mask
    loss, _ = ppo_loss(
        logp,
        prox,
        advantages,
        mask,
        behaviour_logprobs=batch.behaviour_logprobs,
        behaviour_weight_level=level,
        behaviour_weight_cap=None,
    )
    loss = loss - 0.1 * aggregate_loss(entropy, mask)
    loss = loss + 0.1 * aggregate_loss(kl_penalty(logp, prox - 0.3, "low_var_kl"), mask)
    loss.backward()
    grad = logits.grad.abs().sum(-1)
    assert torch.all(grad[mask == 0] == 0), grad
    assert torch.all(grad[mask == 1] > 0), grad


def test_observation_placeholders_do_not_weigh_the_update(tokenizer):
    """The update is the same whatever the (meaningless) log-prob stored at observation
    tokens: no behaviour weight falls on them, in any level or cap mode."""
    for level in ("token", "prefix", "sequence"):
        results = []
        for placeholder in (0.0, -1000.0):  # -1000: exp() overflows if read
            model = tiny_qwen2(tokenizer, hidden_size=32, intermediate_size=64, seed=5)
            samples = [
                conversation(tokenizer, TURNS_A, reward=1.0, placeholder=placeholder),
                conversation(tokenizer, TURNS_B, reward=0.0, placeholder=placeholder),
            ]
            config = PolicyUpdateConfig(lr=1e-2, behaviour_weight_level=level, entropy_coeff=0.01)
            metrics = PolicyUpdater(model, pad_token_id=0, config=config).step(samples)
            results.append((model.state_dict(), metrics))
        (first, m1), (second, m2) = results
        for key in first:
            assert torch.equal(first[key], second[key]), (level, key)
        assert m1["response_length_mean"] == 5.5  # generated tokens only (6 and 5)
        assert m1["behaviour_weight_mean"] == m2["behaviour_weight_mean"]


def test_trainer_logprobs_of_model_tokens_match_the_engine_across_turns(tokenizer):
    """Two engine calls with an observation appended between them (token in, token out):
    the trainer's log-probs of the model's tokens equal the engine's within 1e-4."""
    model = tiny_qwen2(tokenizer, hidden_size=32, intermediate_size=64, seed=4)
    engine = HFGenerationEngine(
        model, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    samples = []
    for text in ("12*34=", "5*6="):
        sample = Sample(
            prompt_token_ids=[tokenizer.bos_token_id, *tokenizer(text)["input_ids"]],
            response_token_ids=[],
            response_logprobs=[],
            v_start=0,
            reward=0.0,
        )
        for turn in range(2):
            (gen,) = engine.generate(
                [sample.prompt_token_ids + sample.response_token_ids], max_new_tokens=4
            )
            sample.append_tokens(gen.response_token_ids, gen.response_logprobs, 0)
            if turn == 0:
                sample.append_observation(tokenizer("=99")["input_ids"])
        samples.append(sample)
    batch = collate(samples, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        recomputed = response_logprobs(model, batch)
    diff = (recomputed - batch.behaviour_logprobs) * batch.response_mask
    assert diff.abs().max() < 1e-4
    assert batch.response_mask.sum() == sum(s.num_generated_tokens for s in samples)


def test_the_queue_counts_generated_tokens_only(tokenizer):
    from miniray.rl.queue import MessageQueue

    queue = MessageQueue(staleness_threshold=0)
    queue.put_samples(conversation(tokenizer, TURNS_A, reward=1.0))  # 6 generated, 4 observed
    assert queue.get_statistics()["accepted_tokens_mean"] == 6
