"""Sample stamps and validation; collating samples into padded tensors."""

from __future__ import annotations

import pickle

import pytest
import torch

from miniray.rl.types import Sample, collate


def make(prompt, response, v_start=0, **kw):
    return Sample(prompt_token_ids=prompt, response_token_ids=response, v_start=v_start, **kw)


def test_stamps_default_and_age():
    s = make([1], [2, 3], v_start=4, response_logprobs=[-0.1, -0.2])
    assert s.v_end == 4 and s.in_flight_span == 0
    assert s.age(6) == 2 and s.num_response_tokens == 2
    assert s.finished_at is None and s.duration_s is None
    s.finish(1.0, now=s.created_at + 3)
    assert s.reward == 1.0 and s.duration_s == 3
    assert pickle.loads(pickle.dumps(s)) == s
    assert make([1], [2]).sample_id != make([1], [2]).sample_id


def test_sample_ids_are_unique_across_processes():
    import os
    import subprocess
    import sys

    ids = [make([1], [2]).sample_id for _ in range(1000)]
    assert len(set(ids)) == 1000 and all(len(i) == 32 for i in ids)
    read, write = os.pipe()
    pid = os.fork()  # a forked child starts from this process's counter: it must not repeat it
    if pid == 0:
        os.write(write, make([1], [2]).sample_id.encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read), os.close(write)
    code = "from miniray.rl.types import new_sample_id; print(new_sample_id())"
    spawned = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout.strip()
    ours = make([1], [2]).sample_id
    assert len({child, spawned, ours} | set(ids)) == 1003
    assert child[:16] != ours[:16] != spawned[:16]


def test_partial_rollout_moves_v_end_not_v_start():
    s = make([1], [2], v_start=1, response_logprobs=[-0.5])
    s.append_tokens([3, 4], [-0.1, -0.2], version=3)
    assert (s.v_start, s.v_end, s.in_flight_span) == (1, 3, 2)
    assert s.response_token_ids == [2, 3, 4] and len(s.response_logprobs) == 3
    assert s.age(4) == 3  # as old as its oldest tokens
    with pytest.raises(ValueError, match="older than the sample's v_end=3"):
        s.append_tokens([5], [-0.1], version=2)
    with pytest.raises(ValueError, match="logprobs must be given"):
        s.append_tokens([5], None, version=3)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"v_start": -1}, "Sample.v_start=-1"),
        ({"v_start": 3, "v_end": 2}, "v_end=2 is invalid"),
        ({"response_logprobs": [0.0]}, "one per response token"),
        ({"created_at": 10.0, "finished_at": 5.0}, "finished_at=5.0 is invalid"),
    ],
)
def test_bad_samples_are_rejected(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        Sample(prompt_token_ids=[1], response_token_ids=[2, 3], **{"v_start": 0, **kwargs})


def test_token_ids_must_be_lists():
    with pytest.raises(TypeError, match="response_token_ids must be a list"):
        Sample(prompt_token_ids=[1], response_token_ids=(2,), v_start=0)


def test_collate_pads_prompts_left_and_responses_right():
    a = make([5, 6, 7], [8], v_start=2, response_logprobs=[-1.0], reward=1.0, group_id="g")
    b = make([9], [10, 11, 12], v_start=3, response_logprobs=[-2.0, -3.0, -4.0], reward=0.0)
    c = make([4], [13], v_start=3, response_logprobs=[-5.0], reward=0.5, group_id="g")
    batch = collate([a, b, c], pad_token_id=0)
    assert len(batch) == 3 and batch.prompt_length == 3
    assert batch.input_ids.tolist() == [
        [5, 6, 7, 8, 0, 0],
        [0, 0, 9, 10, 11, 12],
        [0, 0, 4, 13, 0, 0],
    ]
    assert batch.attention_mask.tolist() == [
        [1, 1, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 1],
        [0, 0, 1, 1, 0, 0],
    ]
    assert batch.response_mask.tolist() == [[1, 0, 0], [1, 1, 1], [1, 0, 0]]
    assert batch.response_ids.tolist() == [[8, 0, 0], [10, 11, 12], [13, 0, 0]]
    assert batch.behaviour_logprobs.tolist() == [[-1, 0, 0], [-2, -3, -4], [-5, 0, 0]]
    assert batch.rewards.tolist() == [1.0, 0.0, 0.5]
    assert batch.v_start.tolist() == [2, 3, 3]
    assert batch.group_index.tolist() == [0, 1, 0]  # a and c answer the same prompt
    assert batch.input_ids.dtype == torch.long


def test_collate_needs_rewards_and_consistent_logprobs():
    with pytest.raises(ValueError, match="has no reward"):
        collate([make([1], [2])], pad_token_id=0)
    with pytest.raises(ValueError, match="either every sample"):
        collate(
            [make([1], [2], reward=1.0, response_logprobs=[0.0]), make([1], [2], reward=1.0)],
            pad_token_id=0,
        )
    with pytest.raises(ValueError, match="at least one sample"):
        collate([], pad_token_id=0)
    batch = collate([make([1], [2], reward=1.0)], pad_token_id=0)
    assert batch.behaviour_logprobs is None
