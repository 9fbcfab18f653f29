"""Sampling with a Hugging Face causal LM (CPU or one GPU), recording exact behaviour log-probs.

We write the sampling loop (prefill, then one token at a time with the KV cache) rather than
call ``model.generate``: its default generation config may add top-k or top-p filtering, and
the log-probs the trainer divides by must be those of the distribution actually sampled. With
``top_k`` / ``top_p`` (``actor_rollout_ref.rollout``) that distribution is the filtered one,
renormalised (``sampling_log_probs``), and the recorded log-probs are its: with ``top_k=1``
every sampled token's log-prob is 0.
"""

from __future__ import annotations

import inspect
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from miniray.rl.engines.base import Generation, check_generate_args
from miniray.rl.state_slots import StateSlots


class HFGenerationEngine:
    """Batched sampling from any causal LM (``model`` object, or a local ``model_path``)."""

    def __init__(
        self,
        model: Any = None,
        *,
        model_path: str | pathlib.Path | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        seed: int = 0,
        num_threads: int | None = None,
        dtype: str | torch.dtype = torch.float32,
        trust_remote_code: bool = False,
        device: str | torch.device | None = None,
    ):
        """``device``: where the model generates; None leaves a given ``model`` where it is
        (a ``model_path`` loads onto the CPU). The inputs, the KV cache and the sampling
        generator live there too."""
        if (model is None) == (model_path is None):
            raise ValueError("HFGenerationEngine needs exactly one of model= or model_path=")
        if model_path is not None:
            from miniray.rl.models.tiny import load

            model, tokenizer = load(model_path, dtype=dtype, trust_remote_code=trust_remote_code)
            eos_token_id = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
            pad_token_id = tokenizer.pad_token_id if pad_token_id is None else pad_token_id
        config = model.config
        if device is not None:
            model = model.to(device)
        self.model = model.eval()
        self.device = next(self.model.parameters()).device
        self.eos_token_id = config.eos_token_id if eos_token_id is None else eos_token_id
        self.pad_token_id = config.pad_token_id if pad_token_id is None else pad_token_id
        if self.eos_token_id is None or self.pad_token_id is None:
            raise ValueError(
                f"HFGenerationEngine: eos_token_id={self.eos_token_id} and "
                f"pad_token_id={self.pad_token_id} must both be known (pass them explicitly)"
            )
        self.cache_argument = cache_argument(self.model)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self._slot_cache: StateSlots | None = None  # where load_weights puts each entry
        if num_threads is not None:
            torch.set_num_threads(num_threads)

    @torch.no_grad()
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
        """Sample one response per prompt; ``temperature=0`` is greedy. ``top_k`` > 0 keeps the
        k most likely tokens, ``top_p`` < 1 the smallest set holding that much probability."""
        check_generate_args(prompts, max_new_tokens, temperature, top_p=top_p, top_k=top_k)
        if not prompts:
            return []
        batch = len(prompts)
        width = max(len(p) for p in prompts)
        input_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for row, prompt in enumerate(prompts):  # left padding: every row ends at the last column
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        # Built on the CPU row by row, moved once: one transfer, not one per row.
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        # Our own cache object, filled in place by every forward pass: reading it back from the
        # output would go through the deprecated ``past_key_values`` attribute on transformers 5.
        cache = new_kv_cache(self.model)
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{self.cache_argument: cache},
        )
        logits = out.logits[:, -1, :]
        tokens: list[list[int]] = [[] for _ in range(batch)]
        logprobs: list[list[float]] = [[] for _ in range(batch)]
        finished = torch.zeros(batch, dtype=torch.bool, device=self.device)
        reason = "length"
        for step in range(max_new_tokens):
            if should_stop is not None and should_stop():
                reason = "aborted"
                break
            logp = sampling_log_probs(logits, temperature=temperature, top_p=top_p, top_k=top_k)
            if temperature > 0:
                chosen = torch.multinomial(logp.exp(), 1, generator=self.generator).squeeze(-1)
            else:
                chosen = logp.argmax(-1)
            chosen_logp = logp.gather(-1, chosen[:, None]).squeeze(-1)
            was_finished = finished.tolist()
            for row, (token, token_logp) in enumerate(zip(chosen.tolist(), chosen_logp.tolist())):
                if not was_finished[row]:
                    tokens[row].append(token)
                    logprobs[row].append(token_logp)
            finished |= chosen == self.eos_token_id
            # The last token needs no forward pass: nothing would read its logits.
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            chosen = torch.where(finished, torch.full_like(chosen, self.pad_token_id), chosen)
            mask = torch.cat([mask, (~finished).long()[:, None]], dim=1)
            positions = positions[:, -1:] + 1
            out = self.model(
                input_ids=chosen[:, None],
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **{self.cache_argument: cache},
            )
            logits = out.logits[:, -1, :]
        done = finished.tolist()
        return [
            Generation(
                prompt_token_ids=list(prompt),
                response_token_ids=tokens[row],
                response_logprobs=logprobs[row],
                finish_reason="stop" if done[row] else reason,
            )
            for row, prompt in enumerate(prompts)
        ]

    def load_weights(self, state_dict: Mapping[str, Any], *, take: bool = False) -> None:
        """Replace the weights (strict: a missing or unexpected name is an error, raised
        before anything is loaded).

        ``take=True`` hands the tensors over: the caller will not use them again (the
        rollouter's sync gives fresh private copies). Those already of the parameter's dtype,
        device and shape then become the parameters as they are, with no second copy; the rest
        are copied into the existing parameters. Measured at Qwen2.5-0.5B size in bf16
        (benchmarks/weight_sync.py): copying cost 604 ms of a 610 ms sync; taking them through
        ``load_state_dict(assign=True)`` ~6 ms (its walk over 1,276 modules), and setting the
        290 parameters directly (``StateSlots``) ~1 ms.
        """
        slots = self._slots()
        missing = [k for k in slots.names if k not in state_dict and k not in slots.tied]
        unexpected = [k for k in state_dict if k not in slots.known]
        if missing or unexpected:
            raise ValueError(
                f"load_weights: missing parameters {missing[:5]}, unexpected "
                f"{unexpected[:5]} (is this the same architecture?)"
            )
        assign: dict[str, Any] = {}
        copy: dict[str, Any] = {}
        for name, tensor in state_dict.items():
            (assign if take and slots.takes(name, tensor) else copy)[name] = tensor
        if assign:
            slots.assign(assign)  # tied entries tied again (new Parameter objects)
        if copy:
            self.model.load_state_dict(copy, strict=False)

    def _slots(self) -> StateSlots:
        if self._slot_cache is None:  # worked out at the first load, not by engines that never load
            self._slot_cache = StateSlots(self.model)
        return self._slot_cache

    def state_dict(self) -> dict[str, Any]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}


def sampling_log_probs(
    logits: torch.Tensor, *, temperature: float = 1.0, top_p: float = 1.0, top_k: int = -1
) -> torch.Tensor:
    """Log-probs (``(B, V)``) of the distribution sampled from ``logits``: scaled by
    ``temperature`` (0: greedy, unscaled), then cut to the ``top_k`` most likely tokens and to
    the smallest set whose probability reaches ``top_p``, renormalised. Tokens cut are -inf.
    Ties at the k-th logit are all kept; the most likely token always is."""
    scaled = logits.float() / (temperature if temperature > 0 else 1.0)
    if 0 < top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(scaled, dim=-1, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        # A token is cut when the tokens before it already hold top_p: the first never is.
        before = torch.cumsum(probs, dim=-1) - probs
        cut = torch.zeros_like(scaled, dtype=torch.bool).scatter(-1, order, before >= top_p)
        scaled = scaled.masked_fill(cut, float("-inf"))
    return torch.log_softmax(scaled, dim=-1)


def cache_argument(model: Any) -> str:
    """The name ``model.forward`` takes its KV cache under.

    transformers 5.24 renamed ``past_key_values`` to ``cache`` and warns that the old name goes
    in 5.40; the 4.x releases we support know only ``past_key_values``. ``inspect.signature``
    sees through transformers' deprecation wrapper to the real parameters.
    """
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def new_kv_cache(model: Any) -> Any:
    """An empty ``DynamicCache`` for ``model`` (laid out from its config where supported)."""
    from transformers import DynamicCache

    if "config" in inspect.signature(DynamicCache).parameters:
        return DynamicCache(config=model.config)
    return DynamicCache()


def sequence_logprobs(
    model: Any, prompt: list[int], response: list[int], *, temperature: float = 1.0
) -> torch.Tensor:
    """Log-probs of ``response`` given ``prompt`` under ``model`` (teacher forcing)."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
    logp = torch.log_softmax(logits / (temperature if temperature > 0 else 1.0), dim=-1)
    return logp.gather(-1, torch.tensor(response)[:, None]).squeeze(-1)
