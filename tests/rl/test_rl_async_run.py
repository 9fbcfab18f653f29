"""End-to-end runs of the RL loop on a tiny model: async, strictly on-policy, sync, crashes."""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch

import miniray
from miniray.rl.engines.base import Generation
from miniray.rl.loop import run
from miniray.rl.models import char_tokenizer, save, tiny_qwen2
from miniray.rl.param_sync import ParameterSyncError
from miniray.rl.queue import MessageQueue, ProducerCrashedError
from miniray.rl.rollouter import FullyAsyncRollouter
from miniray.rl.tasks import ArithmeticTask, write_prompts
from miniray.rl.trainer import FullyAsyncTrainer
from miniray.rl.weight_publisher import extrapolate

TASK = ArithmeticTask(max_operand=9)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl")
    tokenizer = char_tokenizer(TASK.alphabet)
    save(tiny_qwen2(tokenizer, hidden_size=32, intermediate_size=64), tokenizer, root / "model")
    write_prompts(TASK.rows(200), root / "train.parquet")
    return root


def config(workdir, **async_training):
    return {
        "data": {
            "train_files": [str(workdir / "train.parquet")],
            "train_batch_size": 2,
            "max_prompt_length": 8,
            "max_response_length": 3,
        },
        "actor_rollout_ref": {
            "model": {"path": str(workdir / "model")},
            "actor": {"optim": {"lr": 1e-3}},
            "rollout": {"n": 4},
        },
        "async_training": {"max_queue_size": 8, "generation_timeout": 60, **async_training},
        "trainer": {"total_training_steps": 6, "trigger_parameter_sync_step": 1},
    }


@pytest.fixture
def rt():
    miniray.init(backend="local", num_workers=1)
    yield
    miniray.shutdown()


@pytest.mark.slow
def test_async_run_trains_overlapping_and_respects_the_staleness_bound(rt, workdir):
    result = run(config(workdir, staleness_threshold=1), eval_rows=TASK.rows(8, split="test"))
    summary = result.summary
    assert summary["steps"] == 6 and summary["mode"] == "async"
    assert summary["max_age"] <= 1
    assert len(result.ages) == 6 * 2
    assert 0.0 <= summary["initial_reward"] <= 1.0 and 0.0 <= summary["final_reward"] <= 1.0
    assert [m["version"] for m in result.history] == [1, 2, 3, 4, 5, 6]
    # The loop does not wait for the queue's answer to a version bump; it must still land.
    assert result.queue_stats["current_param_version"] == 6
    assert summary["sync_ms_p50"] > 0
    assert summary["sync_phase_ms"]["pause_p50"] >= 0 and "load_p95" in summary["sync_phase_ms"]


@pytest.mark.slow
def test_each_async_step_goes_to_the_trainer_before_the_previous_ones_result(
    rt, workdir, monkeypatch
):
    """The rank goes from one step to the next without waiting for the driver: the loop
    sends step k+1 (its batch still the queue's ref) before it takes step k's result, except
    after a step whose weights are evaluated; each step carries the version it trains at."""
    from miniray.rl.trainer_group import TrainerGroup

    events: list[tuple] = []
    send, answer = TrainerGroup.send_step, TrainerGroup.step_result

    def spy_send(self, groups, version=None):
        events.append(("send", isinstance(groups, miniray.ObjectRef), version))
        return send(self, groups, version)

    def spy_result(self):
        events.append(("result",))
        return answer(self)

    monkeypatch.setattr(TrainerGroup, "send_step", spy_send)
    monkeypatch.setattr(TrainerGroup, "step_result", spy_result)
    cfg = config(workdir, staleness_threshold=1)
    cfg["trainer"]["test_freq"] = 3
    result = run(cfg, eval_rows=TASK.rows(4, split="test"))
    assert result.summary["max_age"] <= 1 and [e[0] for e in result.evals] == [0, 3, 6]
    r = ("result",)
    assert events == [
        ("send", False, 0),
        ("send", True, 1),
        r,
        ("send", True, 2),
        r,
        r,  # step 3 is evaluated: step 4 waits for it
        ("send", False, 3),
        ("send", True, 4),
        r,
        ("send", True, 5),
        r,
        r,
    ]


@pytest.mark.slow
def test_strictly_on_policy_never_trains_on_older_data(rt, workdir):
    result = run(config(workdir, staleness_threshold=0))
    assert result.ages and set(result.ages) == {0}


@pytest.mark.slow
def test_sync_baseline_runs_on_the_same_workload(rt, workdir):
    result = run(config(workdir, mode="sync"))
    assert result.summary["mode"] == "sync" and result.summary["steps"] == 6
    assert set(result.ages) == {0}


def broken_reward(response, truth):
    raise ZeroDivisionError("the reward function is broken")


@pytest.mark.slow
def test_a_crashed_rollouter_surfaces_as_an_error_not_a_clean_end(rt, workdir):
    start = time.monotonic()
    with pytest.raises(ProducerCrashedError, match="reward function is broken"):
        run(config(workdir), reward_fn=broken_reward)
    assert time.monotonic() - start < 60


class FakeEngine:
    """Generates one token per call slowly, so pause can interrupt it mid-generation."""

    def __init__(self):
        self.loaded = None

    def generate(self, prompts, *, max_new_tokens, temperature=1.0, should_stop=None):
        for _ in range(50):
            if should_stop is not None and should_stop():
                return [
                    Generation(
                        prompt_token_ids=p,
                        response_token_ids=[],
                        response_logprobs=[],
                        finish_reason="aborted",
                    )
                    for p in prompts
                ]
            time.sleep(0.01)
        return [
            Generation(
                prompt_token_ids=p,
                response_token_ids=[5],
                response_logprobs=[-1.0],
                finish_reason="length",
            )
            for p in prompts
        ]

    def load_weights(self, state_dict, *, take=False):
        self.loaded = state_dict


def test_pause_and_resume_answer_true_while_generating_and_while_idle(workdir):
    queue = MessageQueue(max_queue_size=100, staleness_threshold=3)
    rollouter = FullyAsyncRollouter(config(workdir), queue, engine=FakeEngine())
    assert rollouter.pause_rollout() is True  # idle: safe
    assert rollouter.pause_rollout() is True  # idempotent
    assert rollouter.resume_rollout() is True
    assert rollouter.resume_rollout() is True
    rollouter.start()
    time.sleep(0.2)  # in the middle of a generation
    start = time.monotonic()
    assert rollouter.pause_rollout(timeout=5) is True
    assert time.monotonic() - start < 1.0  # the generation stopped at its next token
    assert rollouter.get_statistics()["groups_interrupted"] >= 1
    rollouter.load_weights({"w": 1}, 1)
    assert rollouter.get_statistics()["version"] == 1
    assert rollouter.resume_rollout() is True
    time.sleep(1.0)
    rollouter.stop()
    stats = rollouter.get_statistics()
    assert stats["groups_accepted"] >= 1 and stats["error"] is None
    item = queue.get_samples(current_param_version=1)
    assert item[0].v_start in (0, 1)


@pytest.mark.parametrize("resume_on_load", [False, True])
def test_resume_on_load_resumes_once_the_weights_are_in(workdir, resume_on_load):
    cfg = config(workdir, resume_on_load=resume_on_load)
    rollouter = FullyAsyncRollouter(cfg, MessageQueue(max_queue_size=100), engine=FakeEngine())
    rollouter.start()
    try:
        assert rollouter.pause_rollout(timeout=5) is True
        rollouter.engine = BadWeightsEngine()
        with pytest.raises(ValueError, match="unexpected parameters"):
            rollouter.load_weights({"w": 1}, 1)
        assert rollouter.get_statistics()["paused"] is True  # a failed load resumes nothing
        rollouter.engine = FakeEngine()
        rollouter.load_weights({"w": 1}, 1)
        stats = rollouter.get_statistics()
        assert stats["version"] == 1 and stats["paused"] is (not resume_on_load)
        assert rollouter.resume_rollout() is True  # the synchronizer's resume: fine either way
        assert rollouter.get_statistics()["paused"] is False
    finally:
        rollouter.stop()


def test_swap_weights_pauses_loads_and_resumes_in_one_call_even_when_the_load_fails(workdir):
    # resume_on_load off: the swap's own resume is what leaves the rollouter running.
    cfg = config(workdir, resume_on_load=False)
    rollouter = FullyAsyncRollouter(cfg, MessageQueue(max_queue_size=100), engine=FakeEngine())
    with pytest.raises(TypeError, match="exactly one of weights= or refs="):
        rollouter.swap_weights(1)
    rollouter.start()
    try:
        time.sleep(0.2)  # in the middle of a generation: the swap interrupts it
        rollouter.engine = BadWeightsEngine()
        with pytest.raises(ValueError, match="unexpected parameters"):
            rollouter.swap_weights(1, weights={"w": 1}, timeout=5)
        stats = rollouter.get_statistics()
        assert stats["paused"] is False and stats["version"] == 0  # running, old weights
        rollouter.engine = FakeEngine()
        answer = rollouter.swap_weights(2, weights={"w": 1}, timeout=5)
        assert set(answer) == {"pause_s", "load_s", "by_value"}
        assert min(answer["pause_s"], answer["load_s"]) >= 0
        assert answer["by_value"] is True  # its engine is in this process: send values
        stats = rollouter.get_statistics()
        assert stats["version"] == 2 and stats["paused"] is False
        assert stats["groups_interrupted"] >= 1
    finally:
        rollouter.stop()


class SlowLoadEngine(FakeEngine):
    def load_weights(self, state_dict, *, take=False):
        time.sleep(0.3)
        super().load_weights(state_dict, take=take)


def test_swaps_run_one_at_a_time_and_never_take_the_version_back(workdir):
    # Two swaps reaching the threaded actor close together (a swap sent with its step runs
    # when its weights are stored): the later version may arrive first; the older one then
    # waits for it and is skipped.
    rollouter = FullyAsyncRollouter(
        config(workdir), MessageQueue(max_queue_size=100), engine=SlowLoadEngine()
    )
    rollouter.start()
    try:
        first: list[dict] = []
        newer = threading.Thread(
            target=lambda: first.append(rollouter.swap_weights(2, weights={"w": 2}, timeout=5))
        )
        newer.start()
        time.sleep(0.1)  # the newer swap is loading
        with pytest.raises(TimeoutError, match=r"swap_weights\(version=1\) waited 0.05s"):
            rollouter.swap_weights(1, weights={"w": 1}, timeout=0.05)
        started = time.monotonic()
        answer = rollouter.swap_weights(1, weights={"w": 1}, timeout=5)
        assert time.monotonic() - started >= 0.1  # waited for the swap before it
        newer.join(10)
        assert answer["skipped"] is True and "skipped" not in first[0]
        assert rollouter.get_statistics()["version"] == 2 and rollouter.engine.loaded == {"w": 2}
        assert rollouter.swap_weights(2, weights={"w": 1}, timeout=5)["skipped"] is True
        assert rollouter.swap_weights(3, weights={"w": 3}, timeout=5).get("skipped") is None
        assert rollouter.engine.loaded == {"w": 3}
    finally:
        rollouter.stop()


def test_load_weights_while_generating_is_refused(workdir):
    rollouter = FullyAsyncRollouter(
        config(workdir), MessageQueue(max_queue_size=10), engine=FakeEngine()
    )
    rollouter.start()
    try:
        with pytest.raises(RuntimeError, match="pause_rollout"):
            rollouter.load_weights({}, 1)
    finally:
        rollouter.stop()


class RecordingEngine:
    """Answers every prompt with its own first token; records the size of every call."""

    def __init__(self, abort: bool = False):
        self.calls: list[int] = []
        self.abort = abort

    def generate(self, prompts, *, max_new_tokens, temperature=1.0, should_stop=None):
        self.calls.append(len(prompts))
        reason = "aborted" if self.abort else "length"
        return [
            Generation(
                prompt_token_ids=list(p),
                response_token_ids=[p[1]],
                response_logprobs=[-0.5],
                finish_reason=reason,
            )
            for p in prompts
        ]

    def load_weights(self, state_dict, *, take=False):
        pass


def test_groups_are_sampled_several_per_engine_call_each_from_its_own_prompt(workdir):
    cfg = config(workdir, max_concurrent_rollouts=12)  # n=4: 3 groups per call
    engine = RecordingEngine()
    rollouter = FullyAsyncRollouter(cfg, MessageQueue(max_queue_size=10), engine=engine)
    assert rollouter.groups_per_call() == 3
    groups = rollouter.generate_batch(5, version=0)
    assert engine.calls == [12, 8]  # 3 groups, then the 2 the batch still needs
    assert [len(g) for g in groups] == [4] * 5
    positions = [g[0].metadata["prompt_position"] for g in groups]
    assert positions == [0, 1, 2, 3, 4]
    for group in groups:  # every sample of a group shares its prompt, group id and position
        assert len({(s.group_id, s.prompt, s.metadata["prompt_position"]) for s in group}) == 1
        assert {s.response_token_ids[0] for s in group} == {group[0].prompt_token_ids[1]}
    assert len({g[0].group_id for g in groups}) == 5


def test_an_interrupted_call_gives_every_prompt_back(workdir):
    cfg = config(workdir, max_concurrent_rollouts=12)
    rollouter = FullyAsyncRollouter(
        cfg, MessageQueue(max_queue_size=10), engine=RecordingEngine(abort=True)
    )
    assert rollouter.generate_groups(3, version=0) is None
    assert rollouter.get_statistics()["groups_aborted"] == 3
    rollouter.engine = RecordingEngine()
    again = rollouter.generate_groups(3, version=0)
    assert sorted(g[0].metadata["prompt_position"] for g in again) == [0, 1, 2]


class TokenEngine:
    """One token per 50 ms; a token's log-prob is minus the tag of the weights that made it."""

    def __init__(self):
        self.tag = 0

    def generate(self, prompts, *, max_new_tokens, temperature=1.0, should_stop=None):
        made = 0
        while made < max_new_tokens:
            if should_stop is not None and should_stop():
                break
            time.sleep(0.05)
            made += 1
        reason = "length" if made == max_new_tokens else "aborted"
        return [
            Generation(
                prompt_token_ids=list(p),
                response_token_ids=[6] * made,
                response_logprobs=[-float(self.tag)] * made,
                finish_reason=reason,
            )
            for p in prompts
        ]

    def load_weights(self, state_dict, *, take=False):
        self.tag = state_dict["tag"]


def run_with_one_sync(workdir, *, partial, pause_grace_s=0.0):
    cfg = config(
        workdir, max_concurrent_rollouts=4, partial_rollout=partial, pause_grace_s=pause_grace_s
    )  # 1 group a call
    queue = MessageQueue(max_queue_size=100, staleness_threshold=3)
    rollouter = FullyAsyncRollouter(cfg, queue, engine=TokenEngine())
    rollouter.start()
    try:
        time.sleep(0.08)  # one token of three made
        assert rollouter.pause_rollout(timeout=5) is True
        rollouter.load_weights({"tag": 1}, 1)
        rollouter.resume_rollout()
        deadline = time.monotonic() + 10
        while queue.get_queue_size() < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        rollouter.stop()
    first = queue.get_samples(current_param_version=1)
    return first, rollouter.get_statistics()


def test_an_interrupted_group_continues_with_the_new_weights(workdir):
    group, stats = run_with_one_sync(workdir, partial=True)
    # stop() may interrupt a later group too; none is dropped.
    assert stats["groups_interrupted"] >= 1 and stats["groups_aborted"] == 0
    assert stats["groups_partial"] == 1
    for sample in group:
        assert (sample.v_start, sample.v_end) == (0, 1)
        assert sample.response_token_ids == [6, 6, 6]  # tokens made before the sync are kept
        # Each token keeps the behaviour log-prob of the weights that sampled it: first the
        # old weights' (tag 0), then the new ones' (tag 1), at least one of each.
        made_before = sample.response_logprobs.count(-0.0)
        assert 1 <= made_before <= 2
        assert sample.response_logprobs == [-0.0] * made_before + [-1.0] * (3 - made_before)
        assert sample.metadata["prompt_position"] == 0


def test_without_partial_rollouts_an_interrupted_group_is_generated_again(workdir):
    group, stats = run_with_one_sync(workdir, partial=False)
    assert stats["groups_aborted"] >= 1 and stats["groups_partial"] == 0
    for sample in group:
        assert (sample.v_start, sample.v_end) == (1, 1)
        assert sample.response_logprobs == [-1.0, -1.0, -1.0]
        assert sample.metadata["prompt_position"] == 0  # the same prompt, issued again


def test_a_pause_with_grace_lets_a_short_call_finish_whole(workdir):
    # The call makes 3 tokens of 50 ms; paused after the first, a 1 s grace lets it end on
    # its own: the group is made whole by the old weights, nothing is continued.
    group, stats = run_with_one_sync(workdir, partial=True, pause_grace_s=1.0)
    assert stats["groups_partial"] == 0 and stats["groups_aborted"] == 0
    for sample in group:
        assert (sample.v_start, sample.v_end) == (0, 0)
        assert sample.response_logprobs == [-0.0, -0.0, -0.0]


def test_a_pause_grace_does_not_wait_for_a_long_call(workdir):
    cfg = config(workdir, max_concurrent_rollouts=4, pause_grace_s=0.2)
    cfg["data"]["max_response_length"] = 100  # a 5 s call
    rollouter = FullyAsyncRollouter(cfg, MessageQueue(max_queue_size=10), engine=TokenEngine())
    rollouter.start()
    try:
        time.sleep(0.1)
        start = time.monotonic()
        assert rollouter.pause_rollout(timeout=5) is True
        assert 0.15 <= time.monotonic() - start < 1.0  # the grace, then the next token
        assert rollouter.get_statistics()["groups_interrupted"] == 1
    finally:
        rollouter.stop()


class BadWeightsEngine(RecordingEngine):
    """Generates, but refuses every weight load (e.g. weights of another architecture)."""

    def load_weights(self, state_dict, *, take=False):
        raise ValueError("load_weights: unexpected parameters ['lm_head.bias']")


@pytest.mark.slow
def test_a_weight_sync_failing_in_the_background_fails_the_run(rt, workdir):
    cfg = config(workdir, max_sync_retries=0, sync_timeout=10)
    with pytest.raises(ParameterSyncError, match="unexpected parameters"):
        run(cfg, engine=BadWeightsEngine())


class WeightSavingEngine(RecordingEngine):
    """Saves every state dict it is asked to load, in order, to ``directory``."""

    def __init__(self, directory):
        super().__init__()
        self.directory = str(directory)
        self.loads = 0

    def load_weights(self, state_dict, *, take=False):
        self.loads += 1
        torch.save(dict(state_dict), f"{self.directory}/load_{self.loads:03d}.pt")


def random_reward(response, truth):
    """Rewards that differ within every group, so every step has advantages to follow."""
    return random.random()


class SnapshotKeepingTrainer(FullyAsyncTrainer):
    """Keeps a copy of every state dict the loop takes for publishing."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.snapshots: list[dict[str, torch.Tensor]] = []

    def get_weights(self):
        weights = super().get_weights()
        self.snapshots.append({k: v.clone() for k, v in weights.items()})
        return weights

    def live_weights(self):  # the loop's path when it copies the weights out itself
        weights = super().live_weights()
        self.snapshots.append({k: v.clone() for k, v in weights.items()})
        return weights


@pytest.mark.slow
@pytest.mark.parametrize("factor", [0.0, 0.5])
def test_the_rollouter_gets_the_weights_extrapolated_along_the_last_step(
    rt, workdir, tmp_path, factor
):
    cfg = config(workdir, staleness_threshold=1, weight_extrapolation=factor)
    trainer = SnapshotKeepingTrainer(cfg)
    run(cfg, trainer=trainer, engine=WeightSavingEngine(tmp_path), reward_fn=random_reward)
    loads = sorted(tmp_path.glob("load_*.pt"))
    assert len(loads) == len(trainer.snapshots) == 6
    first = torch.load(loads[0])  # nothing to extrapolate from yet
    for name, value in trainer.snapshots[0].items():
        torch.testing.assert_close(first[name], value)
    last, before = trainer.snapshots[-1], trainer.snapshots[-2]
    loaded = torch.load(loads[-1])
    moved = 0.0
    for name, value in last.items():
        torch.testing.assert_close(loaded[name], value + factor * (value - before[name]))
        moved = max(moved, (value - before[name]).abs().max().item())
    assert moved > 1e-4  # the step moved the weights, so the two cases differ


def test_extrapolate_moves_floating_entries_and_keeps_tied_ones_shared():
    shared = torch.tensor([1.0, 2.0])
    weights = {"embed": shared, "lm_head": shared, "steps": torch.tensor([3])}
    earlier_shared = torch.tensor([0.0, 4.0])
    earlier = {"embed": earlier_shared, "lm_head": earlier_shared, "steps": torch.tensor([2])}
    out = extrapolate(weights, earlier, 1.0)
    torch.testing.assert_close(out["embed"], torch.tensor([2.0, 0.0]))
    assert out["lm_head"] is out["embed"]
    assert out["steps"] is weights["steps"]  # integer entries are counters, not weights
    assert extrapolate(weights, None, 1.0) is weights  # nothing to extrapolate from yet
    assert extrapolate(weights, earlier, 0.0) is weights


class SlowQueue:
    """Accepts everything, answering each put only after ``delay_s``; notes when it answered."""

    def __init__(self, delay_s: float):
        self.delay_s = delay_s
        self.answered: list[float] = []
        self.received = 0

    def put_many(self, groups, versions, timeout=None):
        time.sleep(self.delay_s)
        self.received += len(groups)
        self.answered.append(time.monotonic())
        return ["ACCEPTED"] * len(groups)

    def report(self):
        return self.answered, self.received

    def close(self, reason=None):
        return True


class TimedEngine(RecordingEngine):
    def __init__(self):
        super().__init__()
        self.started: list[float] = []

    def generate(self, prompts, **kwargs):
        self.started.append(time.monotonic())
        return super().generate(prompts, **kwargs)


def test_the_rollouter_generates_while_the_queue_answers_its_put(rt, workdir):
    # One group per call; the queue takes 0.4 s to answer each put. The rollouter reads an
    # answer only before its next put, so its second call starts long before the first answer.
    queue = miniray.remote(SlowQueue).remote(0.4)
    assert miniray.get(queue.report.remote(), timeout=60) == ([], 0)  # the actor is up
    engine = TimedEngine()
    rollouter = FullyAsyncRollouter(
        config(workdir, max_concurrent_rollouts=4, staleness_threshold=3), queue, engine=engine
    )
    rollouter.start()
    time.sleep(1.5)
    rollouter.stop()
    answered, received = miniray.get(queue.report.remote(), timeout=30)
    assert len(engine.started) >= 2 and answered
    assert engine.started[1] < answered[0] - 0.2
    # Every answer is read, the last one at stop: what the queue took is what was counted.
    stats = rollouter.get_statistics()
    assert stats["groups_accepted"] == received >= 2
    assert stats["error"] is None


def test_idle_time_is_split_into_paused_and_throttled(workdir):
    # Strictly on-policy, the version never advances: once one batch is admitted the
    # rollouter has no room and waits (throttled); while paused it waits too (paused).
    queue = MessageQueue(max_queue_size=100, staleness_threshold=0)
    rollouter = FullyAsyncRollouter(
        config(workdir, staleness_threshold=0), queue, engine=RecordingEngine()
    )
    rollouter.start()
    try:
        time.sleep(0.6)
        throttled = rollouter.get_statistics()["idle_throttled_seconds"]
        assert throttled > 0.3
        assert rollouter.pause_rollout(timeout=5) is True
        time.sleep(0.6)
        assert rollouter.resume_rollout() is True
        time.sleep(0.1)
    finally:
        rollouter.stop()
    stats = rollouter.get_statistics()
    assert stats["idle_paused_seconds"] > 0.4
    assert stats["idle_seconds"] == pytest.approx(
        stats["idle_paused_seconds"] + stats["idle_throttled_seconds"]
    )
    assert stats["groups_accepted"] == 2  # one batch of 2 groups, nothing beyond the bound


class BrokenQueue:
    """Refuses every put with an error; remembers why it was closed."""

    def __init__(self):
        self.closed_with = None

    def put_many(self, groups, versions, timeout=None):
        raise ConnectionError("queue unreachable")

    def close(self, reason=None):
        self.closed_with = reason
        return True


def test_a_failing_put_stops_the_rollouter_and_closes_the_queue_with_the_error(workdir):
    queue = BrokenQueue()
    rollouter = FullyAsyncRollouter(config(workdir), queue, engine=RecordingEngine())
    rollouter.start()
    deadline = time.monotonic() + 10
    while rollouter.get_statistics()["alive"] and time.monotonic() < deadline:
        time.sleep(0.05)
    rollouter.stop()
    stats = rollouter.get_statistics()
    assert stats["alive"] is False  # the generation loop ended with the sender's failure
    assert "queue unreachable" in stats["error"]
    assert "queue unreachable" in queue.closed_with  # the trainer sees the error, not an end


def test_the_loop_publishes_the_live_weights_once_and_a_later_step_does_not_change_them(
    workdir,
):
    """The snapshot a sync sends is the one copy out of the trainer (a put of the live
    tensors): the next step must not change what was published, and the put must not alias."""
    from miniray.rl.weight_publisher import weights_of

    miniray.init(backend="local", num_workers=1)
    try:
        trainer = FullyAsyncTrainer(config(workdir))
        live = weights_of(trainer, copy=False)
        params = {p.data_ptr() for p in trainer.model.parameters()}
        assert all(t.data_ptr() in params for t in live.values())  # no clone was made
        ref = miniray.put(live)
        with torch.no_grad():
            for p in trainer.model.parameters():
                p.add_(1.0)  # what the next optimizer step does to the live tensors
        published = miniray.get(ref, timeout=60)
        for name, tensor in published.items():
            assert torch.equal(tensor + 1.0, trainer.model.state_dict()[name]), name
        copied = weights_of(trainer, copy=True)
        assert all(t.data_ptr() not in params for t in copied.values())
    finally:
        miniray.shutdown()
