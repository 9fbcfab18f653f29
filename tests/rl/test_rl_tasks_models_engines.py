"""The local building blocks of the RL demo: task and reward, tiny model, generation engine."""

from __future__ import annotations

import pytest
import torch

from miniray.rl.engines import HFGenerationEngine
from miniray.rl.engines.hf import sequence_logprobs
from miniray.rl.models import char_tokenizer, encode_example, load, pretrain, save, tiny_qwen2
from miniray.rl.tasks import ArithmeticTask, exact_match_reward, load_prompts, write_prompts


@pytest.fixture(scope="module")
def task():
    return ArithmeticTask(max_operand=9)


@pytest.fixture(scope="module")
def tokenizer(task):
    return char_tokenizer(task.alphabet)


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_qwen2(tokenizer, hidden_size=32, intermediate_size=64)


def test_problems_are_correct_and_splits_differ(task):
    rows = task.rows(50)
    for row in rows:
        a, b = row["prompt"].rstrip("=").split("+")
        assert int(a) + int(b) == int(row["ground_truth"])
    assert rows != task.rows(50, split="test")
    assert rows == task.rows(50)  # deterministic


def test_subtraction_never_goes_negative():
    for row in ArithmeticTask(max_operand=9, operators="-").rows(100):
        assert int(row["ground_truth"]) >= 0


def test_task_rejects_bad_settings():
    with pytest.raises(ValueError, match="max_operand"):
        ArithmeticTask(max_operand=0)
    with pytest.raises(ValueError, match="operators"):
        ArithmeticTask(operators="*")


@pytest.mark.parametrize(
    ("response", "truth", "reward"),
    [
        ("19", "19", 1.0),
        ("19</s>", "19", 1.0),
        (" 7", "7", 1.0),
        ("17", "19", 0.0),
        ("1", "19", 0.0),
        ("190", "19", 0.0),
        ("", "0", 0.0),
        ("-3", "-3", 1.0),
    ],
)
def test_exact_match_reward(response, truth, reward):
    assert exact_match_reward(response, truth) == reward


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_prompt_files_round_trip(tmp_path, task, suffix):
    rows = task.rows(20)
    path = write_prompts(rows, tmp_path / f"train{suffix}")
    assert load_prompts(path) == rows


def test_prompt_files_accept_verls_nested_ground_truth(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "verl.parquet"
    pq.write_table(
        pa.Table.from_pylist([{"prompt": "1+1=", "reward_model": {"ground_truth": "2"}}]), path
    )
    assert load_prompts(path)[0]["ground_truth"] == "2"


def test_prompt_files_name_the_missing_column(tmp_path):
    path = write_prompts([{"prompt": "1+1="}], tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="ground_truth"):
        load_prompts(path)
    with pytest.raises(ValueError, match=r"\.csv"):
        write_prompts([], tmp_path / "x.csv")
    with pytest.raises(FileNotFoundError):
        load_prompts(tmp_path / "missing.parquet")


def test_tokenizer_round_trips_characters(tokenizer):
    ids = tokenizer("12+7=19")["input_ids"]
    assert len(ids) == 7
    assert tokenizer.decode(ids) == "12+7=19"
    full, start = encode_example(tokenizer, "3+4=", "7")
    assert full[0] == tokenizer.bos_token_id and full[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(full[start:], skip_special_tokens=True) == "7"


def test_model_saves_and_loads_through_from_pretrained(tmp_path, model, tokenizer):
    save(model, tokenizer, tmp_path / "tiny")
    loaded, loaded_tok = load(tmp_path / "tiny")
    assert type(loaded).__name__ == "Qwen2ForCausalLM"
    ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer("1+2=")["input_ids"]]])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    assert loaded_tok.decode(loaded_tok("5+5=")["input_ids"]) == "5+5="
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load(tmp_path)


def test_pretraining_lowers_the_loss(task, tokenizer):
    model = tiny_qwen2(tokenizer, hidden_size=32, intermediate_size=64, seed=1)
    examples = [(r["prompt"], r["ground_truth"]) for r in task.rows(500)]
    losses = pretrain(model, tokenizer, examples, steps=30, batch_size=16, lr=1e-2)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def prompts_for(tokenizer, texts):
    return [[tokenizer.bos_token_id, *tokenizer(t)["input_ids"]] for t in texts]


def test_engine_logprobs_are_the_sampling_distributions(model, tokenizer):
    engine = HFGenerationEngine(
        model, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, seed=3
    )
    prompts = prompts_for(tokenizer, ["1+2=", "12+3=", "9+9="])  # different lengths: padding
    for temperature in (1.0, 0.7):
        for gen in engine.generate(prompts, max_new_tokens=5, temperature=temperature):
            assert len(gen.response_token_ids) == len(gen.response_logprobs) >= 1
            expected = sequence_logprobs(
                model, gen.prompt_token_ids, gen.response_token_ids, temperature=temperature
            )
            assert torch.allclose(torch.tensor(gen.response_logprobs), expected, atol=1e-4)
            if gen.finish_reason == "stop":
                assert gen.response_token_ids[-1] == tokenizer.eos_token_id
            else:
                assert gen.finish_reason == "length" and len(gen.response_token_ids) == 5


def test_top_k_one_samples_the_argmax_with_log_prob_zero(model, tokenizer):
    engine = HFGenerationEngine(
        model, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, seed=1
    )
    prompts = prompts_for(tokenizer, ["1+2=", "12+3=", "9+9="])
    sampled = engine.generate(prompts, max_new_tokens=5, temperature=1.0, top_k=1)
    greedy = engine.generate(prompts, max_new_tokens=5, temperature=0)
    for gen, best in zip(sampled, greedy):
        assert gen.response_token_ids == best.response_token_ids
        assert gen.response_logprobs == [0.0] * len(gen.response_token_ids)


def test_top_p_and_top_k_logprobs_are_of_the_filtered_distribution(model, tokenizer):
    from miniray.rl.engines.hf import sampling_log_probs

    engine = HFGenerationEngine(
        model, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, seed=2
    )
    prompts = prompts_for(tokenizer, ["3+4=", "15+2="])
    for filters in ({"top_k": 3}, {"top_p": 0.5}, {"top_k": 4, "top_p": 0.8}):
        for gen in engine.generate(prompts, max_new_tokens=4, temperature=0.9, **filters):
            ids = torch.tensor([gen.prompt_token_ids + gen.response_token_ids])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, len(gen.prompt_token_ids) - 1 : -1]
            logp = sampling_log_probs(logits, temperature=0.9, **filters)
            kept = torch.isfinite(logp)
            limit = filters.get("top_k", logp.shape[-1])
            assert bool((kept.sum(-1) <= limit).all())  # something was cut
            assert bool((kept.sum(-1) < logp.shape[-1]).all())
            chosen = logp.gather(-1, torch.tensor(gen.response_token_ids)[:, None]).squeeze(-1)
            assert torch.allclose(torch.tensor(gen.response_logprobs), chosen, atol=1e-4)
            # Renormalised: the kept tokens' probabilities sum to one.
            assert torch.allclose(logp.exp().sum(-1), torch.ones(len(chosen)), atol=1e-5)


def test_top_p_keeps_the_smallest_set_reaching_it():
    from miniray.rl.engines.hf import sampling_log_probs

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(sampling_log_probs(logits, top_p=0.7))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 < 0.7 <= 0.5 + 0.3
    assert torch.isfinite(sampling_log_probs(logits, top_p=0.5)).tolist() == [
        [True, False, False, False]
    ]
    assert torch.isfinite(sampling_log_probs(logits, top_k=3)).sum() == 3


def test_engine_greedy_is_deterministic_and_stop_aborts(model, tokenizer):
    engine = HFGenerationEngine(
        model, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    prompts = prompts_for(tokenizer, ["4+4=", "7+1="])
    first = engine.generate(prompts, max_new_tokens=4, temperature=0)
    second = engine.generate(prompts, max_new_tokens=4, temperature=0)
    assert [g.response_token_ids for g in first] == [g.response_token_ids for g in second]
    aborted = engine.generate(prompts, max_new_tokens=4, should_stop=lambda: True)
    assert all(g.finish_reason == "aborted" and g.response_token_ids == [] for g in aborted)


def test_engine_load_weights_changes_the_policy_and_checks_names(model, tokenizer):
    engine = HFGenerationEngine(
        tiny_qwen2(tokenizer, hidden_size=32, intermediate_size=64, seed=7),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    prompt = prompts_for(tokenizer, ["2+2="])[0]
    engine.load_weights(model.state_dict())
    gen = engine.generate([prompt], max_new_tokens=3, temperature=0)[0]
    expected = sequence_logprobs(model, prompt, gen.response_token_ids)
    assert torch.allclose(torch.tensor(gen.response_logprobs), expected, atol=1e-4)
    with pytest.raises(ValueError, match="unexpected"):
        engine.load_weights({**model.state_dict(), "extra.weight": torch.zeros(1)})


def test_engine_from_a_model_directory(tmp_path, model, tokenizer):
    save(model, tokenizer, tmp_path / "m")
    engine = HFGenerationEngine(model_path=tmp_path / "m")
    assert engine.eos_token_id == tokenizer.eos_token_id
    out = engine.generate(prompts_for(tokenizer, ["3+3="]), max_new_tokens=2)
    assert len(out) == 1
    with pytest.raises(ValueError, match="exactly one"):
        HFGenerationEngine()


def test_engine_runs_no_forward_pass_whose_logits_nobody_reads(model, tokenizer):
    engine = HFGenerationEngine(
        model, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    passes = []
    hook = engine.model.register_forward_hook(lambda *args: passes.append(1))
    try:
        gens = engine.generate(prompts_for(tokenizer, ["1+2=", "13+4="]), max_new_tokens=3)
    finally:
        hook.remove()
    # The prefill gives the first token's logits, each later pass the next token's: a
    # response of L tokens needs L passes, and none after the last token.
    assert any(g.finish_reason == "length" for g in gens)  # the case that wasted a pass
    assert len(passes) == max(len(g.response_token_ids) for g in gens)


def test_taking_weights_adopts_the_tensors_without_a_copy_and_keeps_the_tie(model, tokenizer):
    engine = HFGenerationEngine(
        tiny_qwen2(tokenizer, hidden_size=32, intermediate_size=64, seed=8),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    embed = "model.embed_tokens.weight"
    weights["lm_head.weight"] = weights[embed]  # published tied entries are one tensor
    engine.load_weights(weights, take=True)
    params = dict(engine.model.named_parameters())
    assert params[embed].data_ptr() == weights[embed].data_ptr()  # adopted, not copied
    assert engine.model.lm_head.weight is engine.model.model.embed_tokens.weight
    prompt = prompts_for(tokenizer, ["2+3="])[0]
    gen = engine.generate([prompt], max_new_tokens=3, temperature=0)[0]
    expected = sequence_logprobs(model, prompt, gen.response_token_ids)
    assert torch.allclose(torch.tensor(gen.response_logprobs), expected, atol=1e-4)


def test_loading_without_take_copies_and_a_dtype_mismatch_is_copied_even_when_taken(
    model, tokenizer
):
    engine = HFGenerationEngine(
        tiny_qwen2(tokenizer, hidden_size=32, intermediate_size=64, seed=9),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    embed = "model.embed_tokens.weight"
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    engine.load_weights(weights)
    weights[embed].add_(1.0)  # the caller keeps its tensors: the engine must not see this
    assert not torch.equal(engine.model.model.embed_tokens.weight, weights[embed])
    doubles = {k: v.double() for k, v in model.state_dict().items()}
    engine.load_weights(doubles, take=True)
    assert engine.model.model.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(engine.model.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert engine.model.lm_head.weight is engine.model.model.embed_tokens.weight


def test_a_wrong_name_is_refused_before_anything_is_loaded(model, tokenizer):
    engine = HFGenerationEngine(
        tiny_qwen2(tokenizer, hidden_size=32, intermediate_size=64, seed=10),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    before = engine.model.model.embed_tokens.weight.clone()
    weights = {k: v + 1 for k, v in model.state_dict().items()}
    weights["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"unexpected \['extra.weight'\]"):
        engine.load_weights(weights, take=True)
    assert torch.equal(engine.model.model.embed_tokens.weight, before)


def test_taking_weights_again_adopts_the_new_tensors_and_load_hooks_still_run(model, tokenizer):
    def engine_of(seed):
        return HFGenerationEngine(
            tiny_qwen2(tokenizer, hidden_size=32, intermediate_size=64, seed=seed),
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )

    embed, norm = "model.embed_tokens.weight", "model.norm.weight"
    engine = engine_of(11)
    grads = {k: p.requires_grad for k, p in engine.model.named_parameters()}
    for scale in (1.0, 2.0):  # the second load goes through the slots worked out by the first
        weights = {k: v.detach() * scale for k, v in model.state_dict().items()}
        engine.load_weights(weights, take=True)
        params = dict(engine.model.named_parameters())
        assert params[norm].data_ptr() == weights[norm].data_ptr()
        assert {k: p.requires_grad for k, p in params.items()} == grads  # as they were
        assert engine.model.lm_head.weight is engine.model.model.embed_tokens.weight
        assert torch.equal(params[embed], weights[embed])
    # A model with a load hook is loaded through load_state_dict, which runs it.
    hooked = engine_of(12)
    calls = []
    hooked.model.model.norm.register_load_state_dict_pre_hook(lambda *a, **k: calls.append(1))
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    hooked.load_weights(weights, take=True)
    assert calls == [1]
    assert hooked.model.model.norm.weight.data_ptr() == weights[norm].data_ptr()
