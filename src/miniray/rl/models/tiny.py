"""A tiny Qwen2-style causal LM and a character tokenizer, built locally from a config.

No weights can be downloaded here, so the demo and the tests build a model this small (tens of
thousands of parameters), briefly pre-train it on a task's format, save it with
``save_pretrained`` and load it back through ``from_pretrained`` on the directory: the same code
path a user takes with a real checkpoint.
"""

from __future__ import annotations

import pathlib
import random
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

SPECIAL_TOKENS = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>"}


def char_tokenizer(alphabet: str) -> Any:
    """A fast tokenizer with one token per character of ``alphabet`` plus 4 special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if len(set(alphabet)) != len(alphabet):
        raise ValueError(f"alphabet={alphabet!r} has repeated characters")
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS.values())}
    for char in alphabet:
        vocab[char] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk"]))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()  # characters join without spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"],
        unk_token=SPECIAL_TOKENS["unk"],
        # Said explicitly: transformers 4.45 warns that its default is about to change, and
        # the decoder already joins characters without spaces.
        clean_up_tokenization_spaces=False,
    )


def tiny_qwen2(tokenizer: Any, *, seed: int = 0, **overrides: Any) -> Any:
    """A randomly initialised ``Qwen2ForCausalLM`` sized for a CPU demo."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    settings: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 192,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "tie_word_embeddings": True,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    settings.update(overrides)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**settings))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


# Qwen2.5-0.5B's shape (its config.json), for memory and bandwidth work without a download.
QWEN25_05B = {
    "vocab_size": 151936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": True,
}


def qwen25_05b_shaped(tokenizer: Any, *, dtype: torch.dtype = torch.float32, seed: int = 0) -> Any:
    """A ``Qwen2ForCausalLM`` of Qwen2.5-0.5B's shape (494 M parameters, vocabulary 151,936)
    with random weights, in ``dtype``; ``tokenizer`` gives the special token ids (its own
    vocabulary may be smaller: the model's is the real one's, so logits are full size)."""
    model = tiny_qwen2(tokenizer, seed=seed, **QWEN25_05B)
    return model.to(dtype)


def encode_example(tokenizer: Any, prompt: str, answer: str) -> tuple[list[int], int]:
    """Token ids of ``<s> prompt answer </s>`` and where the answer starts."""
    prompt_ids = [tokenizer.bos_token_id, *tokenizer(prompt)["input_ids"]]
    answer_ids = [*tokenizer(answer)["input_ids"], tokenizer.eos_token_id]
    return prompt_ids + answer_ids, len(prompt_ids)


def pretrain(
    model: Any,
    tokenizer: Any,
    examples: Sequence[tuple[str, str]],
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Supervised training on (prompt, answer) pairs, loss on the answer tokens only."""
    if not examples:
        raise ValueError("pretrain(): examples is empty")
    encoded = []
    for prompt, answer in examples:
        ids, answer_start = encode_example(tokenizer, prompt, answer)
        encoded.append((ids, [0] * answer_start + [1] * (len(ids) - answer_start)))
    return pretrain_encoded(
        model,
        tokenizer.pad_token_id,
        encoded,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        on_step=on_step,
    )


def pretrain_encoded(
    model: Any,
    pad_token_id: int,
    encoded: Sequence[tuple[list[int], list[int]]],
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Supervised training on token ids with a loss mask each (1: a token to learn, e.g. an
    assistant turn of a conversation; 0: context only)."""
    if not encoded:
        raise ValueError("pretrain_encoded(): encoded is empty")
    for i, (ids, loss_mask) in enumerate(encoded):
        if len(ids) != len(loss_mask):
            raise ValueError(
                f"pretrain_encoded(): example {i} has {len(ids)} tokens and a loss mask of "
                f"{len(loss_mask)}: they must match"
            )
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for step in range(steps):
        batch = [encoded[rng.randrange(len(encoded))] for _ in range(batch_size)]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        labels = torch.full_like(input_ids, -100)
        mask = torch.zeros_like(input_ids)
        for row, (ids, loss_mask) in enumerate(batch):
            tokens = torch.tensor(ids)
            input_ids[row, : len(ids)] = tokens
            labels[row, : len(ids)] = torch.where(torch.tensor(loss_mask) == 1, tokens, -100)
            mask[row, : len(ids)] = 1
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    return losses


def save(model: Any, tokenizer: Any, path: str | pathlib.Path) -> pathlib.Path:
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _checked(path: str | pathlib.Path) -> pathlib.Path:
    path = pathlib.Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"model path {str(path)!r} has no config.json: pass a directory written by "
            "save_pretrained (no hub downloads happen here)"
        )
    return path


def load_tokenizer(path: str | pathlib.Path, *, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(_checked(path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# from_pretrained builds the model under a context that swaps torch's parameter registration
# for the whole process (weights start on the "meta" device, then get loaded). Two threads
# loading at once (the inline backend runs the rollouter's engine and the trainer in one
# process) saw each other's swap: "expected device meta but got cpu". One load at a time.
_LOAD_LOCK = threading.Lock()


def load(
    path: str | pathlib.Path,
    *,
    dtype: torch.dtype | str = torch.float32,
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """Load any Hugging Face causal LM and its tokenizer from a local directory, in ``dtype``
    (a torch dtype or its name, ``"bfloat16"``); ``trust_remote_code`` as transformers takes it
    (a model whose code lives in its directory needs it)."""
    from transformers import AutoModelForCausalLM

    if isinstance(dtype, str):
        dtype = torch_dtype(dtype)
    with _LOAD_LOCK:
        tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            _checked(path), trust_remote_code=trust_remote_code, **dtype_argument(dtype)
        )
    model.eval()
    return model, tokenizer


def load_options(model_config: Any, *, device: str = "cpu") -> dict[str, Any]:
    """``load``'s keywords from ``actor_rollout_ref.model`` (dtype, trust_remote_code), for a
    model that runs on ``device``. float16 is refused on the CPU: its matmuls are emulated
    (slow, and some kernels are missing) and its range overflows in training; bfloat16 keeps
    float32's range."""
    if model_config.dtype == "float16" and device == "cpu":
        raise ValueError(
            f"{model_config.key('dtype')}='float16' is refused on the CPU (this run trains and "
            "generates there): use bfloat16 (the same memory, float32's range) or float32"
        )
    return {"dtype": model_config.dtype, "trust_remote_code": model_config.trust_remote_code}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of ``actor_rollout_ref.model.dtype`` (float32, bfloat16, float16)."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype={name!r} is not a floating-point torch dtype")
    return dtype


def dtype_argument(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``from_pretrained``'s dtype keyword for the installed transformers.

    4.56 renamed ``torch_dtype`` to ``dtype`` and warns on the old name; the 4.45-4.55 releases
    we support pass an unknown ``dtype`` on to the model's constructor, which refuses it.
    """
    import transformers
    from packaging.version import Version

    new = Version(transformers.__version__) >= Version("4.56")
    return {"dtype": dtype} if new else {"torch_dtype": dtype}
