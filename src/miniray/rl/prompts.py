"""Prompt rows in verl's layout, and the one way a row's prompt becomes token ids.

A row, as verl's parquet files hold it::

    {"prompt": [{"role": "user", "content": "12+7="}],        # or a plain string
     "data_source": "arithmetic",
     "reward_model": {"ground_truth": "19", "style": "rule"},
     "extra_info": {"split": "train", "index": 0}}

``load_prompts`` reads parquet or JSON lines and checks every row once, at start: the prompt column
(``data.prompt_key``) holds text or a list of ``{"role", "content"}`` messages, and the answer is
found (``data.answer_key``, ``ground_truth`` or ``reward_model.ground_truth``); a row that breaks
a rule is an error naming the file, the row and the column. Rows keep their other fields.

``prompt_token_ids`` is used by every reader of prompts (the rollouter, the held-out evaluation,
distillation, pre-training examples), so a prompt is tokenized the same way everywhere:

* text: BOS (when the tokenizer has one) followed by the text's tokens, no other special tokens;
* chat messages: ``tokenizer.apply_chat_template(messages, add_generation_prompt=True)``, as
  verl does; the template decides the special tokens, so no BOS is added here. A multi-turn
  run passes its tools' schemas (``tools=``), which the template renders (Qwen2.5's lists
  them in the system prompt), as verl's tool agent loop does.
"""

from __future__ import annotations

import json
import logging
import pathlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "FittedPrompts",
    "TrainingPrompts",
    "answer_of",
    "check_prompt",
    "fit_prompt_lengths",
    "load_prompts",
    "prompt_text",
    "prompt_token_ids",
    "read_training_prompts",
    "row_extra_info",
]

logger = logging.getLogger(__name__)

Prompt = str | list[dict[str, str]]


def load_prompts(
    path: str | pathlib.Path, *, prompt_key: str = "prompt", answer_key: str = "ground_truth"
) -> list[dict[str, Any]]:
    """Every row of ``path`` (``.parquet`` or ``.jsonl``), checked; the answer is also stored
    as ``row["ground_truth"]`` (text) for the reward."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    elif path.suffix == ".jsonl":
        with path.open() as f:
            rows = [json.loads(line) for line in f if line.strip()]
    else:
        raise ValueError(f"data file {str(path)!r}: suffix must be .parquet or .jsonl")
    for i, row in enumerate(rows):
        where = f"{path}: row {i}"
        if prompt_key not in row or row[prompt_key] is None:
            raise ValueError(
                f"{where} lacks the column {prompt_key!r} (data.prompt_key); it has "
                f"{sorted(row)}: set data.prompt_key to the column that holds the prompt"
            )
        check_prompt(row[prompt_key], where=f"{where}, column {prompt_key!r}")
        ground_truth = answer_of(row, answer_key)
        if ground_truth is None:
            raise ValueError(
                f"{where} lacks the column {answer_key!r} (data.answer_key) and has no "
                f"ground_truth or reward_model.ground_truth; it has {sorted(row)}"
            )
        row["ground_truth"] = str(ground_truth)
    return rows


def check_prompt(prompt: Any, *, where: str) -> None:
    """A prompt is non-empty text or a non-empty list of ``{"role": str, "content": str}``."""
    if isinstance(prompt, str):
        return
    if not isinstance(prompt, list | tuple) or not prompt:
        raise ValueError(
            f"{where} holds {type(prompt).__name__} {short_repr(prompt)}; a prompt is text or a "
            "non-empty list of chat messages ({'role': ..., 'content': ...})"
        )
    for j, message in enumerate(prompt):
        ok = (
            isinstance(message, Mapping)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        )
        if not ok:
            raise ValueError(
                f"{where}, message {j} is {short_repr(message)}; each chat message needs a text "
                "'role' and a text 'content'"
            )


def answer_of(row: Mapping[str, Any], answer_key: str) -> object | None:
    """What the reward compares a response against: the column the config names first, then
    the layouts this package and verl write (``ground_truth``, ``reward_model.ground_truth``)."""
    for value in (row.get(answer_key), row.get("ground_truth")):
        if value is not None:
            return value
    nested = row.get("reward_model")
    return nested.get("ground_truth") if isinstance(nested, Mapping) else None


def row_extra_info(row: Mapping[str, Any]) -> dict[str, Any]:
    """verl's ``extra_info`` (a dict; absent or null is empty)."""
    extra = row.get("extra_info")
    return dict(extra) if isinstance(extra, Mapping) else {}


def prompt_text(tokenizer: Any, prompt: Prompt, *, tools: Sequence[Any] | None = None) -> str:
    """The prompt as the model sees it, as text (chat messages rendered by the template)."""
    if isinstance(prompt, str):
        return prompt
    return _render(tokenizer, prompt, tokenize=False, tools=tools)


def prompt_token_ids(
    tokenizer: Any, prompts: Sequence[Prompt], *, tools: Sequence[Any] | None = None
) -> list[list[int]]:
    """Token ids of each prompt (see the module docstring); text prompts in one tokenizer call
    (one call per prompt cost the CPU rollouter ~4% of its time). ``tools``: function schemas
    the chat template renders into chat prompts (text prompts have no template)."""
    out: list[list[int] | None] = [None] * len(prompts)
    texts = [(i, p) for i, p in enumerate(prompts) if isinstance(p, str)]
    if texts:
        bos = tokenizer.bos_token_id
        encoded = tokenizer([p for _, p in texts], add_special_tokens=False)["input_ids"]
        for (i, _), ids in zip(texts, encoded):
            out[i] = [t for t in (bos, *ids) if t is not None]
    for i, p in enumerate(prompts):
        if not isinstance(p, str):  # chat messages (the texts are all in ``out`` already)
            out[i] = list(_render(tokenizer, p, tokenize=True, tools=tools))
    return [ids for ids in out if ids is not None]


def _render(
    tokenizer: Any,
    messages: Sequence[Mapping[str, str]],
    *,
    tokenize: bool,
    tools: Sequence[Any] | None = None,
) -> Any:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "a prompt is a list of chat messages but the tokenizer of "
            "actor_rollout_ref.model.path has no chat_template: give the model directory a "
            "tokenizer with one (tokenizer_config.json 'chat_template'), or use text prompts"
        )
    rendered = tokenizer.apply_chat_template(
        [dict(m) for m in messages],
        add_generation_prompt=True,
        tokenize=tokenize,
        **({"tools": list(tools)} if tools else {}),
    )
    if tokenize and isinstance(rendered, Mapping):  # transformers 5 returns a BatchEncoding
        rendered = rendered["input_ids"]
    return rendered


def short_repr(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class FittedPrompts:
    """The prompts a run uses after ``data.max_prompt_length``: which rows (``kept``, indices
    into the rows given), their token ids, and how many were dropped or cut."""

    kept: list[int]
    token_ids: list[list[int]]
    dropped: int = 0
    truncated: int = 0


def fit_prompt_lengths(
    token_ids: Sequence[list[int]],
    data: Any,
    *,
    row_name: Callable[[int], str],
) -> FittedPrompts:
    """Apply ``data.max_prompt_length`` to tokenized prompts as verl does.

    * ``data.filter_overlong_prompts=true``: overlong prompts are dropped (and counted);
    * else ``data.truncation``: ``error`` raises naming the row (``row_name(i)``: its file and
      row) and its length; ``left`` keeps the last ``max_prompt_length`` tokens, ``right`` the
      first ones. A cut prompt may ask another question than its row's answer answers; verl
      allows it and so do we, on request.
    """
    limit, mode = data.max_prompt_length, data.truncation
    if data.filter_overlong_prompts:
        kept = [i for i, ids in enumerate(token_ids) if len(ids) <= limit]
        return FittedPrompts(
            kept=kept,
            token_ids=[list(token_ids[i]) for i in kept],
            dropped=len(token_ids) - len(kept),
        )
    fitted, truncated = [], 0
    for i, ids in enumerate(token_ids):
        if len(ids) > limit:
            if mode == "error":
                raise ValueError(
                    f"{row_name(i)}: the prompt has {len(ids)} tokens, more than "
                    f"data.max_prompt_length={limit} (data.truncation='error', "
                    "data.filter_overlong_prompts=false): raise the limit, set "
                    "data.filter_overlong_prompts=true to drop such prompts, or "
                    "data.truncation=left|right to cut them"
                )
            ids = ids[len(ids) - limit :] if mode == "left" else ids[:limit]
            truncated += 1
        fitted.append(list(ids))
    return FittedPrompts(kept=list(range(len(token_ids))), token_ids=fitted, truncated=truncated)


@dataclass
class TrainingPrompts:
    """A run's training rows after ``data.max_prompt_length`` and their prompts' token ids."""

    rows: list[dict[str, Any]]
    token_ids: list[list[int]]
    dropped: int = 0
    truncated: int = 0


def read_training_prompts(
    data: Any, tokenizer: Any, *, tools: Sequence[Any] | None = None
) -> TrainingPrompts:
    """Every row of ``data.train_files`` (``data.prompt_key`` / ``data.answer_key``), tokenized
    once (chat prompts with the ``tools`` schemas rendered in) and fitted to
    ``data.max_prompt_length`` (``fit_prompt_lengths``); what was dropped or cut is logged.
    The RL rollouter and distillation both read their prompts here."""
    rows: list[dict[str, Any]] = []
    names: list[str] = []
    for path in data.train_files:
        read = load_prompts(path, prompt_key=data.prompt_key, answer_key=data.answer_key)
        rows.extend(read)
        names.extend(f"{path}: row {i}" for i in range(len(read)))
    if not rows:
        raise ValueError(f"data.train_files={data.train_files} hold no prompts")
    ids = prompt_token_ids(tokenizer, [row[data.prompt_key] for row in rows], tools=tools)
    fitted = fit_prompt_lengths(ids, data, row_name=names.__getitem__)
    if not fitted.kept:
        raise ValueError(
            f"data.max_prompt_length={data.max_prompt_length} is invalid for "
            f"data.train_files={data.train_files}: every one of the {len(rows)} prompts is "
            f"longer (the shortest has {min(len(i) for i in ids)} tokens, BOS included), "
            "and data.filter_overlong_prompts=true drops longer prompts; raise "
            "data.max_prompt_length (or cut them: data.filter_overlong_prompts=false "
            "data.truncation=left|right)"
        )
    if fitted.dropped:
        logger.warning(
            "dropped %d of %d prompts longer than data.max_prompt_length=%d tokens "
            "(data.filter_overlong_prompts=true)",
            fitted.dropped,
            len(rows),
            data.max_prompt_length,
        )
    if fitted.truncated:
        logger.warning(
            "cut %d of %d prompts to data.max_prompt_length=%d tokens (data.truncation=%s)",
            fitted.truncated,
            len(rows),
            data.max_prompt_length,
            data.truncation,
        )
    return TrainingPrompts(
        rows=[rows[i] for i in fitted.kept],
        token_ids=fitted.token_ids,
        dropped=fitted.dropped,
        truncated=fitted.truncated,
    )
