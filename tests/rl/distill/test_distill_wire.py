"""The teacher wire format: round trips, and every malformed frame turned into a WireError."""

from __future__ import annotations

import math
import os
import pickle

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from miniray.rl.distill import wire

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32]


def _frames_bytes(frames):
    return [bytes(f) for f in frames]


@settings(max_examples=60, deadline=None)
@given(
    specs=st.lists(
        st.tuples(
            st.sampled_from(DTYPES),
            st.lists(st.integers(min_value=0, max_value=5), min_size=0, max_size=wire.MAX_NDIM),
        ),
        max_size=4,
    ),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_round_trip_preserves_shapes_dtypes_and_bits(specs, seed):
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i, (dtype, shape) in enumerate(specs):
        # random bytes reinterpreted, so every float bit pattern (NaN, inf, subnormal) travels
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        raw = torch.randint(0, 256, (nbytes,), generator=gen, dtype=torch.uint8)
        tensors[f"t{i}"] = raw.view(dtype).reshape(shape)
    header = {"v": wire.PROTOCOL_VERSION, "op": "test", "id": "r1", "extra": [1, "x", None]}
    frames = _frames_bytes(wire.encode_message(header, tensors))
    got_header, got = wire.decode_message(frames, max_bytes=1 << 20)
    assert got_header == header
    assert list(got) == list(tensors)
    for name, tensor in tensors.items():
        assert got[name].dtype == tensor.dtype
        assert got[name].shape == tensor.shape
        assert torch.equal(
            got[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)
        )


def test_non_contiguous_tensors_are_sent_by_value():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    frames = _frames_bytes(wire.encode_message({"v": 1, "op": "x"}, {"a": t}))
    _, got = wire.decode_message(frames, max_bytes=1 << 20)
    assert torch.equal(got["a"], t)


def test_encode_refuses_dtypes_off_the_allow_list():
    with pytest.raises(ValueError, match=r"float64"):
        wire.encode_message({"v": 1, "op": "x"}, {"a": torch.zeros(2, dtype=torch.float64)})


def _message(descriptors, frames, **header):
    return [msgpack.packb({"v": 1, "op": "x", "tensors": descriptors, **header}), *frames]


@pytest.mark.parametrize(
    ("frames", "match"),
    [
        ([], "empty message"),
        ([b"\xc1\xc1garbage"], "not valid msgpack"),
        ([pickle.dumps(os.system)], "not valid msgpack|must be a msgpack map"),
        ([msgpack.packb([1, 2, 3])], "must be a msgpack map"),
        ([msgpack.packb({"v": 99, "op": "x"})], "'v'=99"),
        ([msgpack.packb({"v": 1, "op": 5})], "'op'=5"),
        ([msgpack.packb({1: 2})], "not valid msgpack"),  # strict_map_key
        (_message("nope", []), "'tensors' must be a list"),
        (_message([["a", "float32", [2]]], []), "lists 1 tensors but the message has 0"),
        (_message([], [b"x"]), "lists 0 tensors but the message has 1"),
        (_message([["a", "float64", [1]]], [b"\0" * 8]), "dtype 'float64' is not one of"),
        (_message([["a", "object", [1]]], [b"\0" * 8]), "dtype 'object' is not one of"),
        (_message([["a", "float32", [3]]], [b"\0" * 8]), "needs 12 bytes, its frame has 8"),
        (_message([["a", "float32", [-1]]], [b""]), "non-negative ints"),
        (_message([["a", "float32", [True]]], [b"\0" * 4]), "non-negative ints"),
        (_message([["a", "float32", [1, 1, 1, 1, 1]]], [b"\0" * 4]), "at most 4"),
        (_message([["a", "int32", [1]], ["a", "int32", [1]]], [b"\0" * 4] * 2), "appears twice"),
        (_message([["", "int32", [1]]], [b"\0" * 4]), "name ''"),
        (_message([["a", "int32"]], [b"\0" * 4]), "must be \\[name, dtype, shape\\]"),
        (_message([["a", [1], [1]]], [b"\0" * 4]), "dtype \\[1\\] is not one of"),  # unhashable
        (_message([["a", {}, [1]]], [b"\0" * 4]), "dtype \\{\\} is not one of"),
        # zero elements, so the byte count matches, but no tensor can have such a dimension:
        # torch.empty raised TypeError (over int64) or RuntimeError (its strides overflow)
        (_message([["a", "float32", [0, 2**63]]], [b""]), r"shape\[1\]=9223372036854775808"),
        (_message([["a", "int64", [2**64 - 1, 0]]], [b""]), r"shape\[0\]=18446744073709551615"),
        (_message([["a", "float32", [0, 2**19, 2**19]]], [b""]), "multiply to 274877906944"),
        (_message([["a", "float32", [0, 2**21]]], [b""]), r"shape\[1\]=2097152 .* 1048576"),
    ],
)
def test_malformed_messages_raise_wire_errors(frames, match):
    with pytest.raises(wire.WireError, match=match) as info:
        wire.decode_message(frames, max_bytes=1 << 20)
    assert info.value.code == wire.BAD_REQUEST


def test_a_shape_within_the_limit_still_decodes():
    # the dimension rule is the message's byte limit, so every shape a sender can fill passes
    frames = _message(
        [["a", "float16", [0, 1 << 20, 1]], ["b", "int64", [1, 2]]], [b"", b"\0" * 16]
    )
    _, got = wire.decode_message(frames, max_bytes=1 << 20)
    assert got["a"].shape == (0, 1 << 20, 1) and got["b"].shape == (1, 2)


# Anything msgpack can carry, so the header's fields are fuzzed with every wrong type.
_INT64 = st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what msgpack can encode
_SCALARS = (
    st.none() | st.booleans() | _INT64 | st.floats() | st.text(max_size=8) | st.binary(max_size=8)
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=12,
)


def _mostly(good, bad, odds=3):
    """``good`` ``odds`` draws in ``odds + 1``: each field then goes wrong alone, often enough
    that a fault deep in the message (a bad dimension behind a valid header) is reached."""
    return st.sampled_from([True] * odds + [False]).flatmap(lambda ok: good if ok else bad)


# Zero-element tensors with huge dimensions need a 0 and a huge value in one shape: both are
# drawn often, because that byte count (0) matches an empty frame and reaches torch.
_DIMS = st.one_of(
    st.integers(min_value=0, max_value=6),
    st.just(0),
    st.sampled_from([2**31, 2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1]),
    st.sampled_from([-1, -(2**63)]) | _INT64 | _VALUES,
)
_DESCRIPTORS = _mostly(
    st.tuples(
        _mostly(st.sampled_from(["a", "b", "input_ids"]), st.text(max_size=70) | _VALUES),
        _mostly(
            st.sampled_from(list(wire.DTYPE_SIZES)),
            st.sampled_from(["float64", "object", "uint8", "torch.float32", ""]) | _VALUES,
        ),
        _mostly(st.lists(_DIMS, max_size=wire.MAX_NDIM), st.lists(_DIMS) | _VALUES),
    ).map(list),
    st.lists(_VALUES, max_size=4) | _VALUES,
)
_HEADERS = _mostly(
    st.fixed_dictionaries(
        {
            "v": _mostly(st.just(wire.PROTOCOL_VERSION), _VALUES, odds=7),
            "op": _mostly(st.sampled_from(["score", "ping"]), _VALUES, odds=7),
            "tensors": _mostly(st.lists(_DESCRIPTORS, min_size=1, max_size=2), _VALUES, odds=7),
        },
        optional={
            "id": _mostly(st.just("r1"), st.text(max_size=140) | _VALUES),
            "lengths": _mostly(st.lists(st.integers(0, 9), max_size=4), _VALUES),
            "topk": _mostly(st.integers(0, 5), _VALUES),
            "temperature": _mostly(st.just(1.0), st.floats() | _VALUES),
            "token_logprobs": _mostly(st.booleans(), _VALUES),
            "token": _VALUES,
        },
    ),
    st.dictionaries(_INT64 | st.text(max_size=3), _VALUES, max_size=3) | _VALUES,
    odds=7,
)


def _fitting_frame(descriptor):
    """The byte count a well-formed descriptor asks for, when small: the frame then matches."""
    if not (isinstance(descriptor, list) and len(descriptor) == 3):
        return None
    _, dtype, shape = descriptor
    if not (isinstance(dtype, str) and dtype in wire.DTYPE_SIZES and isinstance(shape, list)):
        return None
    if not all(type(d) is int for d in shape):
        return None
    nbytes = wire.DTYPE_SIZES[dtype] * math.prod(shape)
    return nbytes if 0 <= nbytes <= 4096 else None


@settings(max_examples=500, deadline=None)
@given(data=st.data())
def test_the_decoder_only_ever_decodes_or_raises_wire_error(data):
    """Random headers and frames: the decoder (and the score parser behind it) must answer
    every one with a result or a WireError; anything else would end a teacher worker."""
    header = data.draw(_HEADERS)
    head = msgpack.packb(header)
    head = data.draw(_mostly(st.just(head), st.just(head[: len(head) // 2]) | st.binary(), 7))
    tensors = header.get("tensors") if isinstance(header, dict) else None
    descriptors = tensors if isinstance(tensors, list) else []
    frames = [head]
    for descriptor in descriptors:
        fitting = _fitting_frame(descriptor)
        if fitting is not None and data.draw(_mostly(st.just(True), st.just(False))):
            frames.append(data.draw(st.binary(min_size=fitting, max_size=fitting)))
        else:
            frames.append(data.draw(st.binary(max_size=64)))
    # the frame count off, at times: one too many, one too few, none at all
    extra = data.draw(_mostly(st.just([]), st.lists(st.binary(max_size=16), max_size=2), 7))
    frames = data.draw(_mostly(st.just(frames + extra), st.sampled_from([frames[:-1], []]), 7))
    try:
        decoded, tensors = wire.decode_message(frames, max_bytes=1 << 20)
    except wire.WireError:
        return
    assert isinstance(decoded, dict)
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())
    try:
        wire.parse_score_request(decoded, tensors, vocab_size=16, max_seq_len=8, max_topk=4)
    except wire.WireError:
        pass


@settings(max_examples=300, deadline=None)
@given(
    dtype=st.sampled_from(list(wire.DTYPE_SIZES)),
    shape=st.lists(
        st.one_of(
            st.just(0),
            st.integers(min_value=1, max_value=8),
            st.sampled_from([2**31, 2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1]),
            _INT64,
        ),
        max_size=wire.MAX_NDIM + 1,
    ),
    payload=st.binary(max_size=32),
)
def test_any_shape_decodes_or_raises_wire_error(dtype, shape, payload):
    """The shape alone, behind a valid header: with a frame of exactly the declared size
    whenever that size is small (zero, above all), so the shape reaches the tensor builder."""
    fitting = _fitting_frame(["a", dtype, shape])
    frames = _message([["a", dtype, shape]], [b"\0" * fitting if fitting is not None else payload])
    try:
        _, tensors = wire.decode_message(frames, max_bytes=1 << 20)
    except wire.WireError:
        return
    assert list(tensors["a"].shape) == shape


def test_size_limits_are_checked_before_parsing():
    frames = _message([["a", "int64", [100]]], [b"\0" * 800])
    with pytest.raises(wire.WireError, match="limit is 500") as info:
        wire.decode_message(frames, max_bytes=500)
    assert info.value.code == wire.TOO_LARGE
    with pytest.raises(wire.WireError, match="header frame has") as info:
        wire.decode_header(b"\0" * (wire.MAX_HEADER_BYTES + 1))
    assert info.value.code == wire.TOO_LARGE


def _score_request(seqs, **kwargs):
    ids = torch.tensor([t for s in seqs for t in s], dtype=torch.int64)
    options = {"topk": 3, "temperature": 1.0}
    options.update(kwargs)
    frames = _frames_bytes(wire.encode_score_request("r7", ids, [len(s) for s in seqs], **options))
    return wire.decode_message(frames, max_bytes=1 << 20)


def test_score_request_round_trip():
    header, tensors = _score_request([[1, 2, 3], [4]], topk=5, temperature=0.5, token="t")
    assert header["token"] == "t"
    request = wire.parse_score_request(header, tensors, vocab_size=10, max_seq_len=8)
    assert request.request_id == "r7"
    assert request.lengths == [3, 1]
    assert request.rows == 2
    assert (request.topk, request.temperature, request.token_logprobs) == (5, 0.5, True)
    assert request.input_ids.tolist() == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("seqs", "kwargs", "limits", "match"),
    [
        ([[1, 10]], {}, {}, r"token id 10 .* outside the vocabulary \[0, 10\)"),
        ([[1, -1]], {}, {}, r"token id -1"),
        ([[1, 2]], {"topk": 11}, {}, r"'topk'=11 must be an int in \[0, 10\]"),
        ([[1, 2]], {"topk": 5}, {"max_topk": 4}, r"'topk'=5 must be an int in \[0, 4\]"),
        ([[1, 2]], {"temperature": 0.0}, {}, "'temperature'=0.0"),
        ([[1, 2]], {"temperature": float("nan")}, {}, "'temperature'=nan"),
        ([[1] * 9], {}, {"max_seq_len": 8}, "exceeds the model's max_position_embeddings 8"),
        ([[1, 2]], {"topk": 0, "token_logprobs": False}, {}, "asks for nothing"),
    ],
)
def test_invalid_score_requests_are_named(seqs, kwargs, limits, match):
    header, tensors = _score_request(seqs, **kwargs)
    with pytest.raises(wire.WireError, match=match):
        wire.parse_score_request(header, tensors, vocab_size=10, **limits)


def test_score_request_field_checks():
    header, tensors = _score_request([[1, 2, 3]])
    good = dict(header)
    for field, value, match in [
        ("lengths", [], "'lengths'=\\[\\] must be a non-empty list"),
        ("lengths", [0, 3], "'lengths'\\[0\\]=0"),
        ("lengths", [2], "has 3 tokens, field 'lengths' sums to 2"),
        ("id", None, "'id'=None"),
        ("id", "x" * 200, "must be a string"),
        ("topk", True, "'topk'=True"),
    ]:
        bad = {**good, field: value}
        with pytest.raises(wire.WireError, match=match):
            wire.parse_score_request(bad, tensors, vocab_size=10)
    with pytest.raises(wire.WireError, match="must be 1-D int"):
        wire.parse_score_request(good, {"input_ids": tensors["input_ids"].float()}, vocab_size=10)
    with pytest.raises(wire.WireError, match="must be exactly"):
        wire.parse_score_request(good, {**tensors, "more": tensors["input_ids"]}, vocab_size=10)


def test_scores_reply_round_trip_and_shape_checks():
    tok = torch.randn(5)
    lp, idx = torch.randn(5, 2), torch.randint(0, 9, (5, 2))
    frames = wire.encode_scores_reply("r", token_logprobs=tok, topk_logprobs=lp, topk_indices=idx)
    header, tensors = wire.decode_message(_frames_bytes(frames), max_bytes=1 << 20)
    got_tok, got_lp, got_idx = wire.parse_scores_reply(header, tensors, lengths=[4, 1, 3], topk=2)
    assert [t.tolist() for t in got_tok] == [tok[:3].tolist(), [], tok[3:].tolist()]
    assert torch.equal(torch.cat(got_lp), lp) and torch.equal(torch.cat(got_idx), idx)
    with pytest.raises(wire.WireError, match=r"expected torch\.float32 \[6\]"):
        wire.parse_scores_reply(header, tensors, lengths=[4, 4], topk=2)
    with pytest.raises(wire.WireError, match="reply tensors"):
        wire.parse_scores_reply(header, tensors, lengths=[4, 1, 3], topk=0)
