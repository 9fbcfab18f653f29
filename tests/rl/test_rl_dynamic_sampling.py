"""Dynamic sampling: groups without reward spread are dropped and the batch refilled."""

from __future__ import annotations

import pytest

from miniray.rl.dynamic_sampling import REWARD_METRICS_KEY, fill_batch, group_metric, has_spread
from miniray.rl.types import Sample


def group(*rewards, acc=None):
    samples = []
    for i, r in enumerate(rewards):
        meta = {} if acc is None else {REWARD_METRICS_KEY: {"acc": acc[i]}}
        samples.append(
            Sample(prompt_token_ids=[1], response_token_ids=[2], v_start=0, reward=r, metadata=meta)
        )
    return samples


def test_spread_is_any_difference_in_the_metric():
    assert has_spread(group(0.0, 1.0), "score")
    assert not has_spread(group(1.0, 1.0), "seq_reward")
    assert not has_spread(group(0.5), "score")
    # the score differs but the reward function's acc does not
    assert not has_spread(group(0.2, 0.9, acc=[1.0, 1.0]), "acc")
    assert group_metric(group(0.2, 0.9, acc=[0.0, 1.0]), "acc") == [0.0, 1.0]


def test_a_metric_the_reward_did_not_return_names_what_it_did_return():
    with pytest.raises(ValueError, match=r"metric='acc'.*returned \[\]"):
        has_spread(group(0.0, 1.0), "acc")


def stream(*groups):
    """A fetch over a fixed stream that records how many groups each call asked for."""
    pending, asked = list(groups), []

    def fetch(count):
        asked.append(count)
        out, pending[:] = pending[:count], pending[count:]
        return out

    return fetch, asked


def test_the_batch_is_filled_from_the_stream_asking_only_for_what_is_missing():
    flat, good = group(1.0, 1.0), group(0.0, 1.0)
    fetch, asked = stream(flat, good, flat, flat, good, good)
    filled = fill_batch(fetch, 3, metric="score", max_num_gen_batches=0)
    assert filled.kept == [good, good, good] and len(filled.dropped) == 3
    assert asked == [3, 2, 1] and filled.fetches == 3


def test_without_drops_one_fetch_is_made():
    good = group(0.0, 1.0)
    fetch, asked = stream(good, good)
    filled = fill_batch(fetch, 2, metric="score", max_num_gen_batches=1)
    assert filled.kept == [good, good] and filled.dropped == [] and asked == [2]


def test_max_num_gen_batches_bounds_the_fetches_with_an_error_saying_what_to_change():
    flat = group(1.0, 1.0)
    fetch, asked = stream(*[flat] * 10)
    with pytest.raises(RuntimeError, match=r"max_num_gen_batches=2 fetches \(4 groups"):
        fill_batch(fetch, 2, metric="score", max_num_gen_batches=2)
    assert asked == [2, 2]
