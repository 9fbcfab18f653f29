"""One policy update moves probability towards rewarded responses and away from the rest."""

from __future__ import annotations

import itertools
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


def test_published_weights_are_a_copy_with_tied_entries_kept_as_one_tensor(tokenizer):
    from miniray.runtime.serialization import serialize

    model = tiny_qwen2(tokenizer, hidden_size=32, intermediate_size=64, seed=4)
    assert model.config.tie_word_embeddings
    weights = PolicyUpdater(model, pad_token_id=tokenizer.pad_token_id).state_dict()
    embedding = model.get_input_embeddings().weight
    assert weights["lm_head.weight"] is weights["model.embed_tokens.weight"]
    assert weights["lm_head.weight"].data_ptr() != embedding.data_ptr()  # a copy, not a view
    assert torch.equal(weights["lm_head.weight"], embedding)
    # Shared once, the tied tensor is pickled once: the stream is as big as without lm_head.
    alone = {k: v for k, v in weights.items() if k != "lm_head.weight"}
    extra = len(serialize(weights, session_id=None).pickled) - len(
        serialize(alone, session_id=None).pickled
    )
    assert extra < 200, extra


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


def test_learning_rate_schedule_warms_up_then_holds_or_decays():
    from miniray.rl.policy import scheduled_lr

    constant = PolicyUpdateConfig(lr=1.0, warmup_steps=4)
    assert [scheduled_lr(constant, s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cosine = PolicyUpdateConfig(
        lr=1.0, warmup_steps=2, warmup_style="cosine", min_lr_ratio=0.1, total_steps=12
    )
    lrs = [scheduled_lr(cosine, s) for s in range(12)]
    assert lrs[:3] == [0.5, 1.0, 1.0]  # warm-up, then the decay starts at the full lr
    assert all(a > b for a, b in itertools.pairwise(lrs[2:]))  # strictly decreasing
    assert lrs[-1] == pytest.approx(0.1)  # the last update runs at min_lr_ratio * lr
    assert scheduled_lr(cosine, 50) == pytest.approx(0.1)  # and it stays there
    with pytest.raises(ValueError, match="total_steps"):
        PolicyUpdateConfig(warmup_style="cosine")
    with pytest.raises(ValueError, match="warmup_style='linear'"):
        PolicyUpdateConfig(warmup_style="linear")
    with pytest.raises(ValueError, match="min_lr_ratio"):
        PolicyUpdateConfig(min_lr_ratio=1.5)


def test_each_update_runs_at_its_scheduled_learning_rate(tokenizer):
    model = tiny_qwen2(tokenizer, hidden_size=32, intermediate_size=64, seed=5)
    _, samples = scored_group(model, tokenizer, "2+2=", "4", "5")
    config = PolicyUpdateConfig(lr=1e-2, warmup_steps=2)
    updater = PolicyUpdater(model, pad_token_id=tokenizer.pad_token_id, config=config)
    seen = [updater.step(samples)["lr"] for _ in range(3)]
    assert seen == [5e-3, 1e-2, 1e-2]
    assert updater.optimizer.param_groups[0]["lr"] == 1e-2


def test_minibatches_take_one_optimizer_step_each_against_the_start_of_the_update(tokenizer):
    model = tiny_qwen2(tokenizer, hidden_size=32, intermediate_size=64, seed=6)
    _, samples = scored_group(model, tokenizer, "4+1=", "5", "6")  # 4 samples
    config = PolicyUpdateConfig(lr=1e-2, ppo_epochs=2, ppo_mini_batch_size=3)
    updater = PolicyUpdater(model, pad_token_id=tokenizer.pad_token_id, config=config)
    steps = []
    original = updater.optimizer.step
    updater.optimizer.step = lambda *a, **k: (steps.append(1), original(*a, **k))[1]
    passes = []
    hook = model.register_forward_hook(
        lambda module, args, kwargs, out: passes.append(kwargs["input_ids"].shape[0]),
        with_kwargs=True,
    )
    try:
        metrics = updater.step(samples)
    finally:
        hook.remove()
    assert len(steps) == 2 * 2  # 2 epochs x minibatches of 3 and 1 samples
    # One pass over the whole batch for the proximal policy, then one per minibatch.
    assert passes == [4, 3, 1, 3, 1]
    # Later minibatches run on moved weights: their ratio to the start is not 1 any more.
    assert metrics["approx_kl"] != 0.0


def test_behaviour_correction_options_change_the_loss(tokenizer):
    model = tiny_qwen2(tokenizer, hidden_size=32, intermediate_size=64, seed=7)
    _, samples = scored_group(model, tokenizer, "3+3=", "6", "7")
    for sample in samples[:1]:  # recorded as far less likely than it is: weights > cap
        sample.response_logprobs = [lp - 3.0 for lp in sample.response_logprobs]

    def metrics_for(**options):
        fresh = tiny_qwen2(tokenizer, hidden_size=32, intermediate_size=64, seed=7)
        config = PolicyUpdateConfig(lr=1e-2, **options)
        return PolicyUpdater(fresh, pad_token_id=tokenizer.pad_token_id, config=config).step(
            samples
        )

    masked = metrics_for(behaviour_weight_mode="mask")
    clamped = metrics_for(behaviour_weight_mode="clamp")
    plain = metrics_for(use_rollout_log_probs=False)
    assert masked["behaviour_filtered_fraction"] > 0
    assert masked["loss"] != pytest.approx(clamped["loss"])
    assert "behaviour_approx_kl" not in plain  # no correction towards the behaviour policy
    assert plain["loss"] != pytest.approx(masked["loss"])


def test_entropy_bonus_and_loss_aggregation_change_the_loss(tokenizer):
    model = tiny_qwen2(tokenizer, hidden_size=32, intermediate_size=64, seed=8)
    _, samples = scored_group(model, tokenizer, "5+4=", "9", "10")  # 2 and 3 tokens

    def metrics_for(**options):
        fresh = tiny_qwen2(tokenizer, hidden_size=32, intermediate_size=64, seed=8)
        config = PolicyUpdateConfig(lr=1e-2, **options)
        return PolicyUpdater(fresh, pad_token_id=tokenizer.pad_token_id, config=config).step(
            samples
        )

    base = metrics_for()
    bonus = metrics_for(entropy_coeff=0.1)
    assert bonus["entropy"] > 0
    assert bonus["loss"] == pytest.approx(base["loss"] - 0.1 * bonus["entropy"], abs=1e-5)
    per_sequence = metrics_for(loss_agg_mode="seq-mean-token-sum")
    assert per_sequence["loss"] != pytest.approx(base["loss"])


def test_trainer_passes_every_actor_option_to_the_update():
    """A config key the update ignores is a silent no-op: each actor/optim key, set to a
    value other than its default, must change the update's config."""
    import dataclasses

    from miniray.rl.config import ActorConfig, RLConfig, ScheduledOptimConfig
    from miniray.rl.trainer import policy_update_config

    different = {
        "optim.lr": 0.5,
        "optim.weight_decay": 0.1,
        "optim.grad_clip": 3.0,
        "optim.lr_warmup_steps_ratio": 0.5,
        "optim.warmup_style": "cosine",
        "optim.min_lr_ratio": 0.5,
        "ppo_epochs": 2,
        "ppo_mini_batch_size": 4,
        "ppo_micro_batch_size_per_gpu": 2,
        "clip_ratio_low": 0.1,
        "clip_ratio_high": 0.3,
        "loss_agg_mode": "seq-mean-token-sum",
        "use_rollout_log_probs": False,
        "behaviour_weight_cap": 2.0,
        "behaviour_weight_mode": "clamp",
        "behaviour_weight_level": "sequence",
        "entropy_coeff": 0.01,
        "use_kl_loss": True,
        "kl_loss_coef": 0.5,
        "kl_loss_type": "k2",
    }
    # actor.checkpoint is the trainer's save_checkpoint's (tests/rl/test_rl_verl_recipe.py);
    # actor.strategy is the trainer group's wrapper (tests/rl/test_rl_trainer_group.py).
    not_update = ("optim", "checkpoint", "strategy")
    actor_keys = {f.name for f in dataclasses.fields(ActorConfig) if f.name not in not_update} | {
        f"optim.{f.name}" for f in dataclasses.fields(ScheduledOptimConfig)
    }
    assert actor_keys == set(different), "a new actor option: add it here and to the trainer"

    def update_config(**actor):
        data = {
            "data": {"train_files": ["prompts.jsonl"]},
            "trainer": {"total_training_steps": 10},
            "actor_rollout_ref": {"model": {"path": "model"}, "actor": actor},
        }
        return policy_update_config(RLConfig.from_dict(data))

    base = update_config()
    for key, value in different.items():
        actor: dict = {}
        *parents, name = key.split(".")
        target = actor
        for parent in parents:
            target = target.setdefault(parent, {})
        target[name] = value
        reference = base
        if key == "optim.min_lr_ratio":  # only read by the cosine decay
            target["warmup_style"] = "cosine"
            reference = update_config(optim={"warmup_style": "cosine"})
        assert update_config(**actor) != reference, key


def test_reference_logprobs_in_chunks_equal_one_pass(tokenizer):
    from miniray.rl.policy import reference_logprobs
    from miniray.rl.types import collate

    model = tiny_qwen2(tokenizer, hidden_size=32, intermediate_size=64, seed=4)
    _, samples = scored_group(model, tokenizer, "2+5=", "7", "71")
    batch = collate(samples, pad_token_id=tokenizer.pad_token_id)
    whole = reference_logprobs(model, batch, micro_batch_size=None)
    for size in (1, 3):
        chunked = reference_logprobs(model, batch, micro_batch_size=size)
        torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)
    assert not whole.requires_grad


def test_kl_loss_pulls_the_policy_back_towards_the_reference(tokenizer):
    """Equal rewards give zero advantage, so only the KL term moves the weights: towards the
    reference, and a reference equal to the policy gives KL 0."""
    from miniray.rl.policy import reference_logprobs
    from miniray.rl.types import collate

    model = tiny_qwen2(tokenizer, hidden_size=32, intermediate_size=64, seed=5)
    reference = tiny_qwen2(tokenizer, hidden_size=32, intermediate_size=64, seed=6)
    _, samples = scored_group(model, tokenizer, "4+4=", "8", "9")
    for sample in samples:
        sample.reward = 1.0
    batch = collate(samples, pad_token_id=tokenizer.pad_token_id)

    def kl_to_reference():
        with torch.no_grad():
            ours = reference_logprobs(model, batch, micro_batch_size=None)
            ref = reference_logprobs(reference, batch, micro_batch_size=None)
        return float((ours - ref).abs().mean())

    config = PolicyUpdateConfig(
        lr=1e-2, use_kl_loss=True, kl_loss_coef=1.0, kl_loss_type="k3", ref_micro_batch_size=2
    )
    updater = PolicyUpdater(
        model, pad_token_id=tokenizer.pad_token_id, config=config, ref_model=reference
    )
    before = kl_to_reference()
    first = updater.step(samples)
    for _ in range(4):
        updater.step(samples)
    assert first["kl_loss"] > 0 and first["kl_coef"] == 1.0
    assert kl_to_reference() < 0.8 * before
    assert all(not p.requires_grad for p in reference.parameters())

    same = tiny_qwen2(tokenizer, hidden_size=32, intermediate_size=64, seed=5)
    twin = tiny_qwen2(tokenizer, hidden_size=32, intermediate_size=64, seed=5)
    zero = PolicyUpdater(same, pad_token_id=tokenizer.pad_token_id, config=config, ref_model=twin)
    assert zero.step(samples)["kl_loss"] == pytest.approx(0.0, abs=1e-6)


def test_kl_loss_needs_a_reference_and_a_known_type(tokenizer):
    model = tiny_qwen2(tokenizer, hidden_size=32, intermediate_size=64, seed=7)
    with pytest.raises(ValueError, match="use_kl_loss=true needs a reference model"):
        PolicyUpdater(
            model, pad_token_id=tokenizer.pad_token_id, config=PolicyUpdateConfig(use_kl_loss=True)
        )
    with pytest.raises(ValueError, match="kl_loss_type='kl'"):
        PolicyUpdateConfig(kl_loss_type="kl")
