"""The reward function layer: verl's compute_score files, normalised results, deadlines."""

from __future__ import annotations

import math
import pickle
import threading
import time

import numpy as np
import pytest

from miniray.rl.rewards import (
    Reward,
    RewardFunctionError,
    RewardRequest,
    RewardScorer,
    load_reward_function,
    pair_reward,
    reward_of,
)

VERL_STYLE = """
CALLS = []

def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    CALLS.append(data_source)
    correct = solution_str.strip() == ground_truth
    return {"score": 1.0 if correct else -0.5, "acc": correct, "pred": solution_str.strip()}

def plain(data_source, solution_str, ground_truth, extra_info):
    return len(solution_str)

def two_args(response, truth):
    return 0.0

NOT_A_FUNCTION = 3
"""


@pytest.fixture
def reward_file(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text(VERL_STYLE)
    return path


def request(solution="19", truth="19", prompt="12+7=", **kw):
    return RewardRequest(solution_str=solution, ground_truth=truth, prompt=prompt, **kw)


def test_a_verl_dict_result_gives_the_score_numeric_metrics_and_other_fields(reward_file):
    scorer = RewardScorer(load_reward_function(reward_file, "compute_score"), timeout_s=5)
    try:
        right, wrong = scorer.score([request("19"), request("18")])
    finally:
        scorer.close()
    assert right == Reward(1.0, {"acc": 1.0}, {"pred": "19"})
    assert wrong.score == -0.5 and wrong.metrics == {"acc": 0.0}


def test_the_function_receives_verls_keywords(tmp_path):
    seen = []

    def compute_score(data_source, solution_str, ground_truth, extra_info):
        seen.append((data_source, solution_str, ground_truth, extra_info))
        return 0.25

    scorer = RewardScorer(compute_score, timeout_s=5)
    try:
        (reward,) = scorer.score([request("7", "8", data_source="gsm8k", extra_info={"index": 3})])
    finally:
        scorer.close()
    assert reward.score == 0.25
    assert seen == [("gsm8k", "7", "8", {"index": 3})]


def test_numbers_of_every_kind_are_scores():
    for value, expected in [(1, 1.0), (True, 1.0), (np.float32(0.5), 0.5), (np.int64(2), 2.0)]:
        assert reward_of(value, where="f").score == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (None, "finite int, float or bool"),
        ("1.0", "finite int, float or bool"),
        (math.nan, "finite int, float or bool"),
        (math.inf, "finite int, float or bool"),
        ({"acc": 1}, "without 'score'"),
        ({"score": None}, "finite int, float or bool"),
    ],
)
def test_a_result_that_is_not_a_finite_score_is_an_error_naming_the_function(value, message):
    scorer = RewardScorer(lambda **kw: value, timeout_s=5)
    try:
        with pytest.raises(RewardFunctionError, match=message) as info:
            scorer.score([request(prompt="3+4=")])
    finally:
        scorer.close()
    assert "'3+4='" in str(info.value) and "<lambda>" in str(info.value)


def test_a_function_that_raises_names_itself_the_prompt_and_the_cause():
    def compute_score(data_source, solution_str, ground_truth, extra_info):
        raise KeyError("missing")

    scorer = RewardScorer(compute_score, timeout_s=5)
    try:
        with pytest.raises(RewardFunctionError) as info:
            scorer.score([request(prompt="5+5=")])
    finally:
        scorer.close()
    text = str(info.value)
    assert "compute_score" in text and "'5+5='" in text and "KeyError" in text
    assert isinstance(info.value.__cause__, KeyError)


@pytest.mark.timeout(30)
def test_a_hung_function_meets_the_deadline_and_the_scorer_refuses_more_work():
    release = threading.Event()

    def compute_score(data_source, solution_str, ground_truth, extra_info):
        if solution_str == "hang":
            release.wait(20)
        return 1.0

    scorer = RewardScorer(compute_score, timeout_s=0.3, max_workers=2)
    try:
        start = time.monotonic()
        with pytest.raises(RewardFunctionError, match="did not return within") as info:
            scorer.score([request("ok"), request("hang", prompt="9+9=")])
        assert time.monotonic() - start < 3
        assert "'9+9='" in str(info.value) and "timeout_s=0.3" in str(info.value)
        with pytest.raises(RewardFunctionError, match="did not return within"):
            scorer.score([request("ok")])
    finally:
        release.set()
        scorer.close()


@pytest.mark.timeout(30)
def test_the_deadline_is_per_call_not_per_group():
    # 6 calls of 0.2 s on 2 threads take 0.6 s: more than one call's 0.45 s limit, and fine.
    def compute_score(data_source, solution_str, ground_truth, extra_info):
        time.sleep(0.2)
        return 1.0

    scorer = RewardScorer(compute_score, timeout_s=0.45, max_workers=2)
    try:
        assert [r.score for r in scorer.score([request()] * 6)] == [1.0] * 6
    finally:
        scorer.close()


def test_a_fast_function_scores_a_group_in_one_task_in_order_and_names_a_failing_prompt():
    seen = []

    def compute_score(data_source, solution_str, ground_truth, extra_info):
        seen.append(threading.current_thread().name)
        if solution_str == "boom":
            raise ValueError("bad")
        return float(solution_str)

    scorer = RewardScorer(compute_score, timeout_s=5, max_workers=4)
    try:
        assert [r.score for r in scorer.score([request(str(i)) for i in range(8)])] == list(
            range(8)
        )
        assert scorer.batched_groups == 0  # nothing known of the function yet: a task per call
        assert scorer.mean_call_s is not None and scorer.mean_call_s < 0.002 / 8
        seen.clear()
        group = [request(str(i)) for i in range(8, 16)]
        assert [r.score for r in scorer.score(group)] == list(range(8, 16))
        assert scorer.batched_groups == 1 and len(set(seen)) == 1  # one task, one thread
        mixed = [request("1", prompt="1+0="), request("boom", prompt="6+6="), request("2")]
        with pytest.raises(RewardFunctionError, match=r"'6\+6='.*ValueError: bad"):
            scorer.score(mixed)
        assert scorer.batched_groups == 2
    finally:
        scorer.close()


@pytest.mark.timeout(30)
def test_a_group_in_one_task_keeps_the_deadline_per_call_and_names_a_hung_prompt():
    slow, release = threading.Event(), threading.Event()

    def compute_score(data_source, solution_str, ground_truth, extra_info):
        if slow.is_set():
            time.sleep(0.2)
        if solution_str == "hang":
            release.wait(20)
        return 1.0

    scorer = RewardScorer(compute_score, timeout_s=0.45, max_workers=2)
    try:
        scorer.score([request()] * 4)  # fast: the next group runs as one task
        slow.set()
        # 3 calls of 0.2 s one after another: 0.6 s in all, over one call's 0.45 s, and fine.
        assert [r.score for r in scorer.score([request()] * 3)] == [1.0] * 3
        assert scorer.batched_groups == 1
        slow.clear()
        scorer.mean_call_s = 0.0  # as fast as before: the next group is one task again
        start = time.monotonic()
        with pytest.raises(RewardFunctionError, match="did not return within") as info:
            scorer.score([request(), request("hang", prompt="8+8="), request()])
        assert scorer.batched_groups == 2 and time.monotonic() - start < 3
        assert "'8+8='" in str(info.value)
        with pytest.raises(RewardFunctionError, match="did not return within"):
            scorer.score([request()])
    finally:
        release.set()
        scorer.close()


def test_loading_checks_the_file_the_name_and_the_signature(reward_file, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"custom_reward_function\.path"):
        load_reward_function(tmp_path / "nope.py")
    with pytest.raises(AttributeError, match=r"name=.missing.*compute_score"):
        load_reward_function(reward_file, "missing")
    with pytest.raises(AttributeError, match="NOT_A_FUNCTION"):
        load_reward_function(reward_file, "NOT_A_FUNCTION")
    with pytest.raises(TypeError, match="must accept the keywords data_source"):
        load_reward_function(reward_file, "two_args")
    broken = tmp_path / "broken.py"
    broken.write_text("import no_such_module_here\n")
    with pytest.raises(ImportError, match="failed to import: ModuleNotFoundError"):
        load_reward_function(broken)
    assert (
        load_reward_function(reward_file, "plain")(
            data_source="", solution_str="abc", ground_truth="", extra_info={}
        )
        == 3
    )


def test_a_pair_reward_adapts_to_verls_keywords():
    fn = pair_reward(lambda response, truth: float(response == truth))
    assert fn(data_source="x", solution_str="4", ground_truth="4", extra_info={}) == 1.0


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="timeout_s"):
        RewardScorer(lambda **kw: 0, timeout_s=0)
    with pytest.raises(ValueError, match="timeout_s"):
        RewardScorer(lambda **kw: 0, timeout_s=math.inf)
    with pytest.raises(ValueError, match="max_workers"):
        RewardScorer(lambda **kw: 0, max_workers=0)


def test_the_error_pickles_with_its_message():
    error = pickle.loads(pickle.dumps(RewardFunctionError("reward function f failed")))
    assert isinstance(error, RewardFunctionError) and str(error) == "reward function f failed"
