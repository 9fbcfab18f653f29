"""One policy update moves probability towards rewarded responses and away from the rest."""

from __future__ import annotations

import math

import pytest
import torch

from miniray.rl.engines import HFGenerationEngine
from miniray.rl.engines.hf import sequence_logprobs
from miniray.rl.models import char_tokenizer, tiny_qwen2
from miniray.rl.policy import PolicyUpdateConfig, PolicyUpdater
from miniray.rl.types import Sample


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer("0123456789+-=")


def scored_group(model, tokenizer, prompt_text, good, bad):
    prompt = [tokenizer.bos_token_id, *tokenizer(prompt_text)["input_ids"]]
    samples = []
    for text, reward in ((good, 1.0), (bad, 0.0), (bad, 0.0), (good, 1.0)):
        response = [*tokenizer(text)["input_ids"], tokenizer.eos_token_id]
        samples.append(
            Sample(
                prompt_token_ids=prompt,
                response_token_ids=response,
                response_logprobs=sequence_logprobs(model, prompt, response).tolist(),
                reward=reward,
                group_id="g0",
                v_start=0,
            )
        )
    return prompt, samples


def test_update_raises_rewarded_and_lowers_unrewarded_logprobs(tokenizer):
    model = tiny_qwen2(tokenizer, hidden_size=32, intermediate_size=64, seed=2)
    prompt, samples = scored_group(model, tokenizer, "3+4=", "7", "8")
    good, bad = samples[0].response_token_ids, samples[1].response_token_ids
    before_good = sequence_logprobs(model, prompt, good).sum()
    before_bad = sequence_logprobs(model, prompt, bad).sum()
    updater = PolicyUpdater(
        model, pad_token_id=tokenizer.pad_token_id, config=PolicyUpdateConfig(lr=1e-2)
    )
    metrics = updater.step(samples)
    assert sequence_logprobs(model, prompt, good).sum() > before_good
    assert sequence_logprobs(model, prompt, bad).sum() < before_bad
    assert metrics["reward_mean"] == 0.5
    assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])
    assert updater.steps == 1


def test_groups_with_equal_rewards_leave_the_policy_unchanged(tokenizer):
    model = tiny_qwen2(tokenizer, hidden_size=32, intermediate_size=64, seed=3)
    _, samples = scored_group(model, tokenizer, "1+1=", "2", "3")
    for sample in samples:
        sample.reward = 1.0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    PolicyUpdater(model, pad_token_id=tokenizer.pad_token_id).step(samples)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_engine_and_trainer_agree_on_logprobs(tokenizer):
    """Behaviour log-probs from the engine equal the trainer's recomputation: ratio 1."""
    from miniray.rl.policy import response_logprobs
    from miniray.rl.types import collate

    model = tiny_qwen2(tokenizer, hidden_size=32, intermediate_size=64, seed=4)
    engine = HFGenerationEngine(
        model, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    prompts = [[tokenizer.bos_token_id, *tokenizer(t)["input_ids"]] for t in ["1+2=", "11+12="]]
    gens = engine.generate(prompts, max_new_tokens=4)
    samples = [
        Sample(
            prompt_token_ids=g.prompt_token_ids,
            response_token_ids=g.response_token_ids,
            response_logprobs=g.response_logprobs,
            reward=0.0,
            v_start=0,
        )
        for g in gens
    ]
    batch = collate(samples, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        recomputed = response_logprobs(model, batch)
    diff = (recomputed - batch.behaviour_logprobs) * batch.response_mask
    assert diff.abs().max() < 1e-4


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="lr"):
        PolicyUpdateConfig(lr=0)
    with pytest.raises(ValueError, match="ppo_epochs"):
        PolicyUpdateConfig(ppo_epochs=0)


@pytest.mark.parametrize("ppo_epochs", [1, 3])
def test_one_forward_pass_per_epoch_and_the_first_is_the_proximal_policy(tokenizer, ppo_epochs):
    model = tiny_qwen2(tokenizer, hidden_size=32, intermediate_size=64, seed=4)
    _, samples = scored_group(model, tokenizer, "2+5=", "7", "6")
    passes = []
    hook = model.register_forward_hook(lambda *args: passes.append(1))
    config = PolicyUpdateConfig(lr=1e-2, ppo_epochs=ppo_epochs, behaviour_weight_cap=None)
    try:
        metrics = PolicyUpdater(model, pad_token_id=tokenizer.pad_token_id, config=config).step(
            samples
        )
    finally:
        hook.remove()
    assert len(passes) == ppo_epochs  # no separate pass for the proximal log-probs
    if ppo_epochs == 1:
        # The proximal policy is theta itself: every ratio is exactly 1, nothing is clipped.
        assert metrics["clip_fraction"] == 0.0
