"""The teacher's wire format: one msgpack header frame, then the raw bytes of each tensor.

A message is a list of zmq frames::

    frame 0     msgpack map, the header: {"v": 1, "op": ..., "id": ..., ...,
                                          "tensors": [[name, dtype, shape], ...]}
    frame 1..n  the little-endian bytes of each tensor listed in "tensors", in that order

Nothing received is ever unpickled: the header is plain msgpack (maps, lists, strings, numbers)
and a tensor is rebuilt from its bytes only after its dtype is on an allow-list and its byte
count equals what the declared shape needs. Every violation raises ``WireError`` naming the
field, the value and the rule, so a server can answer it as an error and keep serving.

On top of the framing sit the teacher's messages (builders for the sender, parsers that
validate for the receiver):

    score   client -> server  header: id, token, lengths, topk, temperature, token_logprobs
                              tensors: input_ids int64 [sum(lengths)] (the sequences, concatenated)
    scores  server -> client  header: id, rows (= sum(len - 1))
                              tensors: token_logprobs float32 [rows],
                                       topk_logprobs float32 [rows, k], topk_indices int64 [rows, k]
    ping    client -> server  header: id, token          (answered by "pong" with server facts)
    error   server -> client  header: id (None when the request had no readable id), code, message

Row ``t`` of a sequence's answer is about the token after position ``t``:
``log p(seq[t + 1] | seq[: t + 1])``, so a sequence of length ``L`` has ``L - 1`` rows.

torch is imported only where tensors are built: the broker process routes frames by their
header alone and never pays torch's import time.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeGuard

import msgpack

if TYPE_CHECKING:
    import torch
    from torch import Tensor  # for annotations where a local ``torch = _torch()`` shadows it

PROTOCOL_VERSION = 1

# dtype name -> bytes per element. Only plain numeric types travel; nothing else is rebuilt.
DTYPE_SIZES = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4}
MAX_NDIM = 4
MAX_HEADER_BYTES = 4 << 20
MAX_ID_CHARS = 128
DEFAULT_MAX_REQUEST_BYTES = 256 << 20
DEFAULT_MAX_REPLY_BYTES = 4 << 30

# Error codes of "error" replies; the client reports them verbatim.
BAD_REQUEST = "bad_request"
TOO_LARGE = "too_large"
UNAUTHORIZED = "unauthorized"
BUSY = "busy"
INTERNAL = "internal"
WORKER_DIED = "worker_died"

if sys.byteorder != "little":  # the tensor frames are raw little-endian memory
    raise ImportError("miniray.rl.distill.wire supports little-endian machines only")


class WireError(ValueError):
    """A message broke the wire format or the teacher protocol; ``code`` is the reply's code."""

    def __init__(self, message: str, *, code: str = BAD_REQUEST):
        super().__init__(message)
        self.code = code


Frame = bytes | bytearray | memoryview


# ---------------------------------------------------------------------------------------------
# Framing


def encode_message(header: Mapping[str, Any], tensors: Mapping[str, torch.Tensor] | None = None):
    """Frames for ``header`` plus ``tensors``: ``[msgpack header, tensor bytes...]``.

    Tensor frames are memoryviews of the (contiguous) tensors' memory: zmq can send them
    without a copy; they keep their tensors alive until sent.
    """
    if "tensors" in header:
        raise ValueError("encode_message(): header key 'tensors' is reserved for the framing")
    descriptors, frames = [], []
    for name, tensor in (tensors or {}).items():
        dtype = str(tensor.dtype).removeprefix("torch.")
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise ValueError(
                f"tensor {name!r} has dtype {dtype}; the wire carries only {sorted(DTYPE_SIZES)}"
            )
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        descriptors.append([name, dtype, list(tensor.shape)])
        # numpy's stubs give ndarray __buffer__ only for Python >= 3.12 (mypy checks 3.11)
        frames.append(memoryview(flat.view(_torch().uint8).numpy()))  # type: ignore[arg-type]
    return [msgpack.packb({**header, "tensors": descriptors}), *frames]


def decode_header(frame: Frame) -> dict[str, Any]:
    """The header of a message: a msgpack map with string keys, protocol version checked."""
    view = memoryview(frame)
    if view.nbytes > MAX_HEADER_BYTES:
        raise WireError(
            f"header frame has {view.nbytes} bytes; the limit is {MAX_HEADER_BYTES}",
            code=TOO_LARGE,
        )
    try:
        header = msgpack.unpackb(view, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types for garbage input
        raise WireError(f"header frame is not valid msgpack ({type(exc).__name__}: {exc})") from exc
    if not isinstance(header, dict):
        raise WireError(f"header must be a msgpack map, got {type(header).__name__}")
    version = header.get("v")
    if version != PROTOCOL_VERSION:
        raise WireError(f"header field 'v'={version!r}: this server speaks v{PROTOCOL_VERSION}")
    if not isinstance(header.get("op"), str):
        raise WireError(f"header field 'op'={header.get('op')!r} must be a string")
    return header


def request_id_of(header: Mapping[str, Any] | None) -> str | None:
    """The message's id if it is a usable one (a short string), else None."""
    rid = None if header is None else header.get("id")
    return rid if isinstance(rid, str) and 0 < len(rid) <= MAX_ID_CHARS else None


def decode_message(
    frames: Sequence[Frame], *, max_bytes: int
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Header and tensors of a message, after checking sizes, dtypes and shapes."""
    if not frames:
        raise WireError("empty message: expected a header frame")
    views = [memoryview(f) for f in frames]
    total = sum(v.nbytes for v in views)
    if total > max_bytes:
        raise WireError(f"message has {total} bytes; the limit is {max_bytes}", code=TOO_LARGE)
    header = decode_header(views[0])
    descriptors = header.pop("tensors", [])
    if not isinstance(descriptors, list):
        raise WireError(f"header field 'tensors' must be a list, got {type(descriptors).__name__}")
    if len(descriptors) != len(views) - 1:
        raise WireError(
            f"header lists {len(descriptors)} tensors but the message has "
            f"{len(views) - 1} tensor frames"
        )
    torch = _torch()
    tensors: dict[str, Tensor] = {}
    for index, (descriptor, view) in enumerate(zip(descriptors, views[1:])):
        name, dtype, shape = _check_descriptor(index, descriptor, max_bytes=max_bytes)
        if name in tensors:
            raise WireError(f"tensor name {name!r} appears twice in header field 'tensors'")
        expected = math.prod(shape) * DTYPE_SIZES[dtype]
        if view.nbytes != expected:
            raise WireError(
                f"tensor {name!r} ({dtype}, shape {shape}) needs {expected} bytes, "
                f"its frame has {view.nbytes}"
            )
        if expected == 0:
            tensors[name] = torch.empty(shape, dtype=getattr(torch, dtype))
        else:  # one copy into memory we own: zmq frames are read-only and die with the message
            flat = torch.frombuffer(bytearray(view), dtype=getattr(torch, dtype))
            tensors[name] = flat.reshape(shape)
    return header, tensors


def _is_number(value: Any) -> TypeGuard[int | float]:
    """An int or a float, exactly: not a bool (nor another subclass)."""
    return type(value) in (int, float)


def _check_descriptor(index: int, descriptor: Any, *, max_bytes: int) -> tuple[str, str, list[int]]:
    where = f"header field 'tensors'[{index}]"
    if not (isinstance(descriptor, list) and len(descriptor) == 3):
        raise WireError(f"{where}={_short(descriptor)} must be [name, dtype, shape]")
    name, dtype, shape = descriptor
    if not isinstance(name, str) or not name or len(name) > 64:
        raise WireError(f"{where}: name {_short(name)} must be a non-empty string of <= 64 chars")
    # isinstance first: a list or map is unhashable, and the lookup would raise TypeError
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise WireError(f"{where}: dtype {_short(dtype)} is not one of {sorted(DTYPE_SIZES)}")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_NDIM
        or not all(type(d) is int and d >= 0 for d in shape)
    ):
        raise WireError(
            f"{where}: shape {_short(shape)} must be a list of at most {MAX_NDIM} non-negative ints"
        )
    # The byte count alone does not bound a shape: with a 0 anywhere it needs 0 bytes whatever
    # the other dimensions are, and torch refuses a dimension over int64 (TypeError) or one
    # whose strides overflow (RuntimeError). A tensor that fits in the message has no dimension
    # longer than the message, and its non-zero dimensions multiply to no more than that either.
    for axis, d in enumerate(shape):
        if d > max_bytes:
            raise WireError(
                f"{where}: shape[{axis}]={d} is larger than {max_bytes}, the message's byte "
                "limit: no tensor that fits in the message has a longer dimension"
            )
    spread = math.prod(d for d in shape if d)
    if spread > max_bytes:
        raise WireError(
            f"{where}: the non-zero dimensions of shape {shape} multiply to {spread}, more than "
            f"{max_bytes}, the message's byte limit"
        )
    return name, dtype, shape


def _torch():
    import torch

    return torch


# ---------------------------------------------------------------------------------------------
# Teacher messages


@dataclass(frozen=True)
class ScoreRequest:
    """A validated ``score`` request: ``input_ids`` holds the sequences back to back."""

    request_id: str
    input_ids: torch.Tensor
    lengths: list[int]
    topk: int
    temperature: float
    token_logprobs: bool

    @property
    def rows(self) -> int:
        return sum(self.lengths) - len(self.lengths)


def encode_score_request(
    request_id: str,
    input_ids: torch.Tensor,
    lengths: Sequence[int],
    *,
    topk: int,
    temperature: float,
    token_logprobs: bool = True,
    token: str | None = None,
):
    header = {
        "v": PROTOCOL_VERSION,
        "op": "score",
        "id": request_id,
        "token": token,
        "lengths": [int(n) for n in lengths],
        "topk": int(topk),
        "temperature": float(temperature),
        "token_logprobs": bool(token_logprobs),
    }
    return encode_message(header, {"input_ids": input_ids})


def parse_score_request(
    header: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    *,
    vocab_size: int,
    max_seq_len: int | None = None,
    max_topk: int | None = None,
) -> ScoreRequest:
    """Check a decoded ``score`` message against the model it is for."""
    rid = request_id_of(header)
    if rid is None:
        raise WireError(f"field 'id'={header.get('id')!r} must be a string of 1-{MAX_ID_CHARS}")
    lengths = header.get("lengths")
    if not isinstance(lengths, list) or not lengths:
        raise WireError(f"field 'lengths'={_short(lengths)} must be a non-empty list of ints")
    for i, n in enumerate(lengths):
        if type(n) is not int or n < 1:
            raise WireError(f"field 'lengths'[{i}]={n!r} must be an int >= 1 (empty sequence)")
        if max_seq_len is not None and n > max_seq_len:
            raise WireError(
                f"field 'lengths'[{i}]={n} exceeds the model's max_position_embeddings "
                f"{max_seq_len}"
            )
    topk = header.get("topk")
    limit = vocab_size if max_topk is None else min(vocab_size, max_topk)
    if type(topk) is not int or not 0 <= topk <= limit:
        raise WireError(f"field 'topk'={topk!r} must be an int in [0, {limit}]")
    temperature = header.get("temperature")
    if not _is_number(temperature) or not math.isfinite(temperature) or temperature <= 0:
        raise WireError(f"field 'temperature'={temperature!r} must be a finite number > 0")
    want_tokens = header.get("token_logprobs")
    if type(want_tokens) is not bool:
        raise WireError(f"field 'token_logprobs'={want_tokens!r} must be a bool")
    if not want_tokens and topk == 0:
        raise WireError("the request asks for nothing: token_logprobs=false and topk=0")
    if set(tensors) != {"input_ids"}:
        raise WireError(f"tensors {sorted(tensors)} must be exactly ['input_ids']")
    ids = tensors["input_ids"]
    if str(ids.dtype) not in ("torch.int64", "torch.int32") or ids.dim() != 1:
        raise WireError(f"tensor 'input_ids' ({ids.dtype}, {list(ids.shape)}) must be 1-D int")
    if ids.numel() != sum(lengths):
        raise WireError(
            f"tensor 'input_ids' has {ids.numel()} tokens, field 'lengths' sums to {sum(lengths)}"
        )
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise WireError(
            f"token id {bad} in 'input_ids' is outside the vocabulary [0, {vocab_size})"
        )
    return ScoreRequest(rid, ids.long(), lengths, topk, float(temperature), want_tokens)


def encode_scores_reply(
    request_id: str,
    *,
    token_logprobs: torch.Tensor | None,
    topk_logprobs: torch.Tensor | None,
    topk_indices: torch.Tensor | None,
    worker: int | None = None,
):
    tensors = {}
    if token_logprobs is not None:
        tensors["token_logprobs"] = token_logprobs.float()
    if topk_logprobs is not None and topk_indices is not None:
        tensors["topk_logprobs"] = topk_logprobs.float()
        tensors["topk_indices"] = topk_indices.long()
    rows = next(iter(tensors.values())).shape[0] if tensors else 0
    return encode_message(
        {"v": PROTOCOL_VERSION, "op": "scores", "id": request_id, "rows": rows, "worker": worker},
        tensors,
    )


def parse_scores_reply(
    header: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    *,
    lengths: Sequence[int],
    topk: int,
) -> tuple[list[torch.Tensor], list[torch.Tensor | None], list[torch.Tensor | None]]:
    """Per-sequence ``(token_logprobs, topk_logprobs, topk_indices)`` of a ``scores`` reply."""
    rows = [n - 1 for n in lengths]
    total = sum(rows)
    expected = {"token_logprobs": ("torch.float32", [total])}
    if topk:
        expected["topk_logprobs"] = ("torch.float32", [total, topk])
        expected["topk_indices"] = ("torch.int64", [total, topk])
    if set(tensors) != set(expected):
        raise WireError(f"reply tensors {sorted(tensors)}, expected {sorted(expected)}")
    for name, (dtype, shape) in expected.items():
        got = tensors[name]
        if str(got.dtype) != dtype or list(got.shape) != shape:
            raise WireError(
                f"reply tensor {name!r} is {got.dtype} {list(got.shape)}, expected {dtype} {shape}"
            )
    token = list(tensors["token_logprobs"].split(rows))
    if not topk:
        return token, [None] * len(rows), [None] * len(rows)
    return (
        token,
        list(tensors["topk_logprobs"].split(rows)),
        list(tensors["topk_indices"].split(rows)),
    )


def encode_ping(request_id: str, *, token: str | None = None):
    return encode_message({"v": PROTOCOL_VERSION, "op": "ping", "id": request_id, "token": token})


def encode_pong(request_id: str | None, info: Mapping[str, Any]):
    return encode_message({"v": PROTOCOL_VERSION, "op": "pong", "id": request_id, **info})


def encode_error(request_id: str | None, code: str, message: str):
    # the message is capped: it may quote client input, and a reply should stay small
    return encode_message(
        {
            "v": PROTOCOL_VERSION,
            "op": "error",
            "id": request_id,
            "code": code,
            "message": message[:2000],
        }
    )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
