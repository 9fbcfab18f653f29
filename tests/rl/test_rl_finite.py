"""rl.finite: a float tensor's NaN/inf found in the pass that copies its bytes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from miniray.rl.finite import copy_finite
from miniray.rl.trainer import _finite_range


@pytest.mark.parametrize(
    "dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int64]
)
def test_a_piece_is_finite_exactly_when_every_entry_is(dtype):
    """``rl.finite.copy_finite`` (the check made as published weights are copied) against
    ``isfinite``: every special value of each dtype, at every place, both signs, and the
    largest finite values (bf16's 0x7F7F / 0xFF7F sit right below the non-finite bits);
    checking alone and copying, whose target gets every byte whatever the answer."""

    def check(piece):
        source = piece.view(torch.uint8).numpy()
        target = np.zeros_like(source)
        alone = copy_finite(source, piece.dtype)
        copied = copy_finite(source, piece.dtype, target)
        assert alone is copied and np.array_equal(target, source)
        return alone

    gen = torch.Generator().manual_seed(5)
    base = (torch.randn(4099, generator=gen) * 3).to(dtype)
    assert copy_finite(base[:0].view(torch.uint8).numpy(), dtype)  # nothing in it
    if not dtype.is_floating_point:
        assert check(base)
        return
    info = torch.finfo(dtype)
    specials = [math.nan, -math.nan, math.inf, -math.inf, info.max, -info.max, info.tiny, 0.0]
    for value in specials:
        for where in (0, 1, 2, 3, 2048, 4098):  # every lane of a word, and the tail
            piece = base.clone()
            piece[where] = value
            expected = bool(torch.isfinite(piece).all())
            assert check(piece) is expected, (value, where)
            assert _finite_range(piece) is expected, (value, where)
    if dtype == torch.bfloat16:  # exponent all ones: every NaN payload, both signs
        for bits in [*range(0x7F80, 0x8000, 7), *range(0xFF80, 0x10000, 7)]:
            piece = base.clone()
            piece.view(torch.int16)[100] = bits - 0x10000 if bits >= 0x8000 else bits
            assert not check(piece), hex(bits)


def test_a_float_type_without_a_compiled_loop_is_checked_by_torch():
    """float8 (no inf, one NaN pattern a sign): copied, then ``isfinite``."""
    piece = torch.linspace(-2, 2, 100).to(torch.float8_e4m3fn)
    source = piece.view(torch.uint8).numpy()
    target = np.zeros_like(source)
    assert copy_finite(source, piece.dtype, target) and np.array_equal(target, source)
    piece[7] = math.nan
    assert not copy_finite(piece.view(torch.uint8).numpy(), piece.dtype)


def test_two_threads_check_at_once():
    """The loops release the GIL (the runtime's copying threads run them side by side); each
    thread gets its own answer."""
    from concurrent.futures import ThreadPoolExecutor

    good = torch.ones(1 << 20, dtype=torch.bfloat16)
    bad = good.clone()
    bad[-1] = math.inf
    with ThreadPoolExecutor(2) as pool:
        answers = list(
            pool.map(lambda t: copy_finite(t.view(torch.uint8).numpy(), t.dtype), [good, bad] * 4)
        )
    assert answers == [True, False] * 4
