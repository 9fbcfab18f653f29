"""Generation with vLLM (GPUs) behind the same ``GenerationEngine`` protocol as transformers.

``vllm`` is imported only when an engine is built, so miniray installs and runs without it.
How each promise of the protocol maps onto vLLM's offline API::

    generate(prompts)   one request per prompt, {"prompt_token_ids": ids} (tokens in, tokens
                        out: the rollouter's tokenizer stays the only one), stepped with
                        llm.llm_engine.add_request / step until every request finished
    behaviour log-probs SamplingParams(logprobs=0): each position's dict {token_id: Logprob}
                        always holds the sampled token; LLM(logprobs_mode="processed_logprobs")
                        makes them log-probs of the temperature-scaled distribution actually
                        sampled (vLLM V1 otherwise reports the raw model's); top_p and top_k
                        go to SamplingParams as the rollouter is given them (top_k 0 or -1:
                        off). Whether vLLM's processed log-probs are those of the top-k/top-p
                        filtered distribution depends on its release (the transformers engine's
                        are, tested); with both off there is nothing to differ
    should_stop         checked between engine steps; abort_request drops the unfinished
                        requests, each reported "aborted" with the tokens (and log-probs) its
                        last step output held (vLLM's outputs are cumulative), requests that
                        finished keep their result: the rollouter continues an aborted one
                        from prompt + partial tokens with the next weights, as verl and AReaL
                        do, instead of generating the whole batch again
    load_weights        model.load_weights([(name, tensor), ...]) on every worker through
                        LLM.collective_rpc (or on the in-process driver worker of older vLLMs)

What has run where: this adapter is tested against a fake ``vllm`` module with the same API
surface (tests/rl/test_rl_vllm_engine.py); it has not run against a real vLLM on a GPU here.
"""

from __future__ import annotations

import itertools
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from miniray.rl.engines.base import Generation, check_generate_args

__all__ = ["VLLMGenerationEngine", "import_vllm"]

INSTALL_HINT = "pip install vllm  (needs a CUDA GPU; see https://docs.vllm.ai)"
_FINISH = {"stop": "stop", "length": "length", "abort": "aborted"}


def import_vllm() -> Any:
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(
            f"actor_rollout_ref.rollout.name='vllm' needs the vllm package, which is not "
            f"installed: {INSTALL_HINT}; on a CPU use rollout.name=transformers"
        ) from exc
    return vllm


class VLLMGenerationEngine:
    """Sampling with a ``vllm.LLM`` built from ``model_path`` (or one passed as ``llm``)."""

    def __init__(
        self,
        model_path: str | pathlib.Path | None = None,
        *,
        llm: Any = None,
        seed: int = 0,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.5,
        trust_remote_code: bool = False,
        **llm_kwargs: Any,
    ):
        if (llm is None) == (model_path is None):
            raise ValueError("VLLMGenerationEngine needs exactly one of model_path= or llm=")
        self._vllm = import_vllm()
        if llm is None:
            # load_weights ships a function to the workers with collective_rpc; vLLM V1 only
            # pickles functions across its processes when this is allowed.
            os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
            llm = self._vllm.LLM(
                model=str(model_path),
                seed=seed,
                dtype=dtype,
                gpu_memory_utilization=gpu_memory_utilization,
                trust_remote_code=trust_remote_code,
                logprobs_mode="processed_logprobs",
                **llm_kwargs,
            )
        self.llm = llm
        self._request_ids = itertools.count()

    def generate(
        self,
        prompts: Sequence[list[int]],
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = -1,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[Generation]:
        check_generate_args(prompts, max_new_tokens, temperature, top_p=top_p, top_k=top_k)
        params = self._vllm.SamplingParams(
            n=1,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k if top_k > 0 else -1,
            max_tokens=max_new_tokens,
            logprobs=0,
        )
        if not prompts:
            return []
        engine = self.llm.llm_engine
        ids = [f"miniray-{next(self._request_ids)}" for _ in prompts]
        wanted = set(ids)
        for request_id, prompt in zip(ids, prompts):
            engine.add_request(request_id, {"prompt_token_ids": list(prompt)}, params)
        done: dict[str, Any] = {}
        latest: dict[str, Any] = {}  # each unfinished request's last (cumulative) output
        while len(done) < len(ids):
            if should_stop is not None and should_stop():
                engine.abort_request([i for i in ids if i not in done])
                return [
                    _generation(prompt, done[i].outputs[0])
                    if i in done
                    else _generation(prompt, latest[i].outputs[0], aborted=True)
                    if i in latest
                    else _aborted(prompt)
                    for i, prompt in zip(ids, prompts)
                ]
            for output in engine.step():
                if output.request_id not in wanted:
                    continue
                if output.finished:
                    done[output.request_id] = output
                else:
                    latest[output.request_id] = output
            if len(done) < len(ids) and not engine.has_unfinished_requests():
                raise RuntimeError(
                    f"vLLM finished {len(done)} of {len(ids)} requests and has none left "
                    "running: requests were lost"
                )
        return [_generation(prompt, done[i].outputs[0]) for i, prompt in zip(ids, prompts)]

    def load_weights(self, state_dict: Mapping[str, Any], *, take: bool = False) -> None:
        """Give every vLLM worker the new weights (HF names; vLLM maps them to its layers).
        vLLM copies them into its own (GPU) memory, so ``take`` changes nothing here."""
        items = [(name, tensor.detach().cpu()) for name, tensor in state_dict.items()]
        if callable(getattr(self.llm, "collective_rpc", None)):
            self.llm.collective_rpc(_load_on_worker, args=(items,))
            return
        driver = getattr(self.llm.llm_engine.model_executor, "driver_worker", None)
        if driver is None:
            raise RuntimeError(
                "load_weights: this vLLM offers neither LLM.collective_rpc nor an in-process "
                "llm_engine.model_executor.driver_worker to load weights through"
            )
        _load_on_worker(driver, items)

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError(
            "VLLMGenerationEngine.state_dict(): vLLM keeps its weights sharded and fused on "
            "its workers and offers no state dict; the trainer's weights are the reference "
            "(FullyAsyncTrainer.get_weights), and nothing in the RL loop reads the engine's"
        )


def _load_on_worker(worker: Any, items: list[tuple[str, Any]]) -> None:
    """Runs on each vLLM worker (collective_rpc calls it with the worker first)."""
    runner = getattr(worker, "model_runner", None) or worker.worker.model_runner
    runner.model.load_weights(weights=items)


def _generation(prompt: Sequence[int], completion: Any, *, aborted: bool = False) -> Generation:
    """``completion`` as a ``Generation``; ``aborted``: an unfinished request's last output,
    its tokens so far (the adapter asks for cumulative outputs, vLLM's default)."""
    tokens = list(completion.token_ids)
    if completion.logprobs is None or len(completion.logprobs) != len(tokens):
        raise RuntimeError(
            f"vLLM returned {0 if completion.logprobs is None else len(completion.logprobs)} "
            f"log-prob entries for {len(tokens)} tokens: the behaviour log-probs are needed "
            "(SamplingParams(logprobs=0))"
        )
    logprobs = []
    for position, (token, entry) in enumerate(zip(tokens, completion.logprobs)):
        if token not in entry:
            raise RuntimeError(
                f"vLLM's log-probs at position {position} lack the sampled token {token}"
            )
        value = entry[token]
        logprobs.append(float(getattr(value, "logprob", value)))
    reason = "aborted" if aborted else _FINISH.get(completion.finish_reason)
    if reason is None:
        raise RuntimeError(f"vLLM finish_reason={completion.finish_reason!r} is not known here")
    return Generation(
        prompt_token_ids=list(prompt),
        response_token_ids=tokens,
        response_logprobs=logprobs,
        finish_reason=reason,
    )


def _aborted(prompt: Sequence[int]) -> Generation:
    return Generation(
        prompt_token_ids=list(prompt),
        response_token_ids=[],
        response_logprobs=[],
        finish_reason="aborted",
    )
