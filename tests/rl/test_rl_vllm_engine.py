"""VLLMGenerationEngine against a fake ``vllm`` module with vLLM's offline API surface.

vLLM cannot be installed here (no GPU); the fake mirrors what the adapter uses: ``LLM`` with
``llm_engine.add_request/step/abort_request/has_unfinished_requests`` and ``collective_rpc``,
``SamplingParams`` (rejecting unknown keywords like the real one), and ``RequestOutput`` /
``CompletionOutput`` carrying ``token_ids`` and per-position ``{token_id: Logprob}`` dicts. Its
"model" is a bias vector over a 6-token vocabulary, so the exact log-probs can be checked.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field

import pytest
import torch

from miniray.rl import engines
from miniray.rl.engines.vllm import VLLMGenerationEngine

VOCAB, EOS = 6, 0


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: None
    outputs: list[CompletionOutput]
    finished: bool


_SAMPLING_KEYS = {"n", "temperature", "top_p", "top_k", "max_tokens", "logprobs", "seed"}


class SamplingParams:
    def __init__(self, **kwargs):
        unknown = set(kwargs) - _SAMPLING_KEYS
        if unknown:
            raise TypeError(f"SamplingParams got unexpected keyword arguments {unknown}")
        self.n = kwargs.get("n", 1)
        self.temperature = kwargs.get("temperature", 1.0)
        self.top_p = kwargs.get("top_p", 1.0)
        self.top_k = kwargs.get("top_k", 0)
        self.max_tokens = kwargs.get("max_tokens", 16)
        self.logprobs = kwargs.get("logprobs")


class FakeModel:
    def __init__(self):
        self.bias = torch.linspace(0.0, 1.0, VOCAB)
        self.loaded: list[str] = []

    def logits(self, last_token: int) -> torch.Tensor:
        return self.bias + 0.3 * torch.roll(torch.arange(VOCAB, dtype=torch.float32), last_token)

    def load_weights(self, weights):
        for name, tensor in weights:
            if name != "bias":
                raise KeyError(f"no parameter named {name}")
            self.bias = tensor.clone()
            self.loaded.append(name)
        return {name for name, _ in weights}


@dataclass
class _Request:
    params: SamplingParams
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)


class FakeEngine:
    """One token per running request per ``step()``; outputs are cumulative, like vLLM's."""

    def __init__(self, llm):
        self.llm = llm
        self.requests: dict[str, _Request] = {}
        self.aborted: list[str] = []
        self.steps = 0

    def add_request(self, request_id, prompt, params):
        assert isinstance(prompt, dict) and set(prompt) == {"prompt_token_ids"}
        self.requests[request_id] = _Request(params, list(prompt["prompt_token_ids"]))

    def abort_request(self, request_ids):
        for request_id in request_ids:
            self.requests.pop(request_id, None)
            self.aborted.append(request_id)

    def has_unfinished_requests(self):
        return bool(self.requests)

    def step(self):
        self.steps += 1
        outputs = []
        for request_id, req in list(self.requests.items()):
            p = req.params
            logits = self.llm.model.logits((req.prompt + req.tokens)[-1])
            scaled = logits / (p.temperature if p.temperature > 0 else 1.0)
            processed = torch.log_softmax(scaled, -1)
            if p.temperature > 0:
                token = int(torch.multinomial(processed.exp(), 1, generator=self.llm.gen))
            else:
                token = int(processed.argmax())
            shown = processed if self.llm.logprobs_mode == "processed_logprobs" else logits
            if self.llm.logprobs_mode != "processed_logprobs":
                shown = torch.log_softmax(logits, -1)
            top = torch.topk(shown, p.logprobs or 0).indices.tolist() if p.logprobs else []
            req.tokens.append(token)
            req.logprobs.append({t: Logprob(float(shown[t])) for t in {token, *top}})
            reason = (
                "stop" if token == EOS else "length" if len(req.tokens) >= p.max_tokens else None
            )
            completion = CompletionOutput(0, "", list(req.tokens), None, list(req.logprobs), reason)
            outputs.append(
                RequestOutput(request_id, None, req.prompt, None, [completion], bool(reason))
            )
            if reason:
                del self.requests[request_id]
        return outputs


class Worker:
    def __init__(self, model):
        self.model_runner = types.SimpleNamespace(model=model)


class LLM:
    instances: list[LLM] = []

    def __init__(
        self,
        model,
        *,
        seed=0,
        dtype="auto",
        gpu_memory_utilization=0.9,
        logprobs_mode="raw_logprobs",
        **kwargs,
    ):
        self.kwargs = dict(model=model, seed=seed, dtype=dtype, **kwargs)
        self.logprobs_mode = logprobs_mode
        self.gen = torch.Generator().manual_seed(seed)
        self.model = FakeModel()
        self.workers = [Worker(self.model), Worker(self.model)]  # e.g. two TP ranks
        self.llm_engine = FakeEngine(self)
        self.rpc_calls = 0
        LLM.instances.append(self)

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        self.rpc_calls += 1
        return [method(worker, *args, **(kwargs or {})) for worker in self.workers]


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM = LLM
    module.SamplingParams = SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    LLM.instances.clear()
    return module


def test_a_missing_vllm_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # "import vllm" now raises ImportError
    with pytest.raises(ImportError, match="pip install vllm"):
        VLLMGenerationEngine("some/model")
    with pytest.raises(ImportError, match=r"rollout\.name=transformers"):
        engines.build_engine("vllm", model_path="some/model")


def test_generate_returns_the_sampled_tokens_with_their_tempered_logprobs(fake_vllm):
    engine = VLLMGenerationEngine("/models/tiny", seed=3)
    llm = LLM.instances[-1]
    assert llm.logprobs_mode == "processed_logprobs" and llm.kwargs["model"] == "/models/tiny"
    gens = engine.generate([[1, 2], [3]], max_new_tokens=5, temperature=0.7)
    assert len(gens) == 2 and gens[1].prompt_token_ids == [3]
    for gen in gens:
        assert 1 <= len(gen.response_token_ids) <= 5
        assert gen.finish_reason == ("stop" if gen.response_token_ids[-1] == EOS else "length")
        context = list(gen.prompt_token_ids)
        for token, logprob in zip(gen.response_token_ids, gen.response_logprobs):
            expected = torch.log_softmax(llm.model.logits(context[-1]) / 0.7, -1)[token]
            assert logprob == pytest.approx(float(expected), abs=1e-6)
            context.append(token)
    assert not llm.llm_engine.requests  # nothing left running


def test_sampling_params_filter_nothing_and_ask_for_the_sampled_logprob(fake_vllm, monkeypatch):
    seen = []
    original = fake_vllm.SamplingParams

    def recording(**kwargs):
        seen.append(kwargs)
        return original(**kwargs)

    monkeypatch.setattr(fake_vllm, "SamplingParams", recording)
    VLLMGenerationEngine("/m").generate([[1]], max_new_tokens=3, temperature=1.3)
    assert seen == [
        {"n": 1, "temperature": 1.3, "top_p": 1.0, "top_k": -1, "max_tokens": 3, "logprobs": 0}
    ]


def test_top_p_and_top_k_go_to_sampling_params(fake_vllm, monkeypatch):
    seen = []
    original = fake_vllm.SamplingParams

    def recording(**kwargs):
        seen.append(kwargs)
        return original(**kwargs)

    monkeypatch.setattr(fake_vllm, "SamplingParams", recording)
    engine = VLLMGenerationEngine("/m")
    engine.generate([[1]], max_new_tokens=2, temperature=1.0, top_p=0.9, top_k=3)
    engine.generate([[1]], max_new_tokens=2, temperature=1.0, top_k=0)  # 0: off, as -1
    assert (seen[0]["top_p"], seen[0]["top_k"]) == (0.9, 3)
    assert (seen[1]["top_p"], seen[1]["top_k"]) == (1.0, -1)
    with pytest.raises(ValueError, match=r"top_p=0 must be in \(0, 1\]"):
        engine.generate([[1]], max_new_tokens=2, top_p=0)


def test_should_stop_aborts_every_running_request(fake_vllm):
    engine = VLLMGenerationEngine("/m")
    llm = LLM.instances[-1]
    llm.model.bias = torch.tensor([-50.0, 0, 0, 0, 0, 0])  # never EOS: runs to max_tokens
    calls = []

    def stop_after_two_steps():
        calls.append(1)
        return len(calls) > 2

    gens = engine.generate([[1], [2], [3]], max_new_tokens=50, should_stop=stop_after_two_steps)
    assert [g.finish_reason for g in gens] == ["aborted"] * 3
    assert len(llm.llm_engine.aborted) == 3 and not llm.llm_engine.has_unfinished_requests()
    assert llm.llm_engine.steps == 2
    # Each keeps the two tokens it had, with their log-probs: the rollouter continues it.
    assert all(len(g.response_token_ids) == len(g.response_logprobs) == 2 for g in gens)
    assert all(lp <= 0 for g in gens for lp in g.response_logprobs)


def stop_after(steps):
    """A should_stop that answers True from its (steps + 1)-th question on."""
    asked = []

    def should_stop():
        asked.append(1)
        return len(asked) > steps

    return should_stop


def test_a_partial_continued_from_its_tokens_is_the_whole_generation(fake_vllm):
    engine = VLLMGenerationEngine("/m")
    LLM.instances[-1].model.bias = torch.tensor([-50.0, 0, 0, 0, 0, 0])  # never EOS
    whole = engine.generate([[2]], max_new_tokens=6, temperature=0.0)[0]
    first = engine.generate([[2]], max_new_tokens=6, temperature=0.0, should_stop=stop_after(2))[0]
    assert first.finish_reason == "aborted" and len(first.response_token_ids) == 2
    # What the rollouter does with it: prompt + partial tokens, the remaining budget.
    rest = engine.generate([[2, *first.response_token_ids]], max_new_tokens=4, temperature=0.0)[0]
    assert first.response_token_ids + rest.response_token_ids == whole.response_token_ids
    assert first.response_logprobs + rest.response_logprobs == pytest.approx(
        whole.response_logprobs
    )


def test_load_weights_reaches_every_worker_and_changes_generation(fake_vllm):
    engine = VLLMGenerationEngine("/m")
    llm = LLM.instances[-1]
    favour_4 = torch.tensor([-30.0, -30, -30, -30, 30, -30])
    engine.load_weights({"bias": favour_4})
    assert llm.rpc_calls == 1 and llm.model.loaded == ["bias", "bias"]  # both workers
    gens = engine.generate([[1]] * 4, max_new_tokens=3)
    assert all(g.response_token_ids == [4, 4, 4] for g in gens)
    with pytest.raises(KeyError, match="no parameter named"):
        engine.load_weights({"not_a_param": torch.zeros(2)})


def test_load_weights_falls_back_to_the_in_process_driver_worker(fake_vllm):
    llm = LLM("/m")
    model = FakeModel()
    llm.llm_engine.model_executor = types.SimpleNamespace(driver_worker=Worker(model))
    bare = types.SimpleNamespace(llm_engine=llm.llm_engine)  # an LLM without collective_rpc
    VLLMGenerationEngine(llm=bare).load_weights({"bias": torch.ones(VOCAB)})
    assert model.loaded == ["bias"] and torch.equal(model.bias, torch.ones(VOCAB))


def test_state_dict_explains_why_it_is_not_offered(fake_vllm):
    with pytest.raises(NotImplementedError, match="trainer's weights are the reference"):
        VLLMGenerationEngine("/m").state_dict()


def test_bad_arguments_and_lost_requests_are_named(fake_vllm):
    engine = VLLMGenerationEngine("/m")
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        engine.generate([[1]], max_new_tokens=0)
    with pytest.raises(ValueError, match="at least one token"):
        engine.generate([[]], max_new_tokens=1)
    with pytest.raises(ValueError, match="exactly one of"):
        VLLMGenerationEngine()
    assert engine.generate([], max_new_tokens=1) == []
    llm = LLM.instances[-1]
    llm.llm_engine.step = lambda: (llm.llm_engine.requests.clear(), [])[1]  # drops them
    with pytest.raises(RuntimeError, match="requests were lost"):
        engine.generate([[1]], max_new_tokens=2)


def test_build_engine_picks_by_rollout_name(fake_vllm):
    assert isinstance(engines.build_engine("vllm", model_path="/m"), engines.VLLMGenerationEngine)
    with pytest.raises(ValueError, match=r"rollout\.name='sglang' is invalid"):
        engines.build_engine("sglang", model_path="/m")


def test_the_rollouter_generates_through_the_vllm_adapter(fake_vllm, tmp_path):
    from miniray.rl.models import char_tokenizer, save, tiny_qwen2
    from miniray.rl.queue import MessageQueue
    from miniray.rl.rollouter import FullyAsyncRollouter
    from miniray.rl.tasks import ArithmeticTask, write_prompts

    task = ArithmeticTask(max_operand=9)
    tokenizer = char_tokenizer(task.alphabet)
    save(tiny_qwen2(tokenizer, hidden_size=16, intermediate_size=32), tokenizer, tmp_path / "m")
    write_prompts(task.rows(10), tmp_path / "train.parquet")
    cfg = {
        "data": {"train_files": [str(tmp_path / "train.parquet")], "train_batch_size": 2},
        "actor_rollout_ref": {"model": {"path": str(tmp_path / "m")}, "rollout": {"n": 3}},
        "async_training": {"max_queue_size": 4},
    }
    queue = MessageQueue(cfg)
    rollouter = FullyAsyncRollouter(cfg, queue, engine=VLLMGenerationEngine("/m"))
    group = rollouter.generate_group()
    assert len(group) == 3 and group[0].metadata["prompt_position"] == 0
    for sample in group:
        assert len(sample.response_logprobs) == len(sample.response_token_ids) >= 1
        assert all(lp <= 0 for lp in sample.response_logprobs)
    assert rollouter.pause_rollout() and rollouter.load_weights({"bias": torch.zeros(VOCAB)}, 1)
    assert LLM.instances[-1].rpc_calls == 1 and rollouter.get_statistics()["version"] == 1
