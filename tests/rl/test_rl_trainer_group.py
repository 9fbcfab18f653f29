"""The trainer group: N data-parallel ranks take the step one rank takes on the whole batch,
a killed rank ends the run naming it, and a 2-rank run resumes training each prompt once."""

from __future__ import annotations

import collections
import math
import os
import re
import signal
import threading
import time
from types import SimpleNamespace

import pytest
import torch
from rl_fakes import Crash, DeterministicEngine, reward_by_digit

import miniray
from miniray.rl import checkpoint
from miniray.rl.errors import NonFiniteWeightsError, TrainerRankError
from miniray.rl.models import char_tokenizer, save, tiny_qwen2
from miniray.rl.rollouter import as_rl_config
from miniray.rl.tasks import ArithmeticTask, write_prompts
from miniray.rl.trainer import FullyAsyncTrainer
from miniray.rl.trainer_group import TrainerGroup, group_plan
from miniray.rl.types import Sample
from process_support import gone, wait_until

TASK = ArithmeticTask(max_operand=9)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl_group")
    tokenizer = char_tokenizer(TASK.alphabet)
    torch.manual_seed(0)
    save(tiny_qwen2(tokenizer, hidden_size=32, intermediate_size=64), tokenizer, root / "model")
    write_prompts(TASK.rows(40), root / "train.parquet")
    return root


def config(workdir, out=None, *, ranks=0, strategy="ddp", timeout=60.0, dtype="float32", **trainer):
    return as_rl_config(
        {
            "data": {
                "train_files": [str(workdir / "train.parquet")],
                "train_batch_size": 2,
                "max_prompt_length": 8,
                "max_response_length": 2,
            },
            "actor_rollout_ref": {
                "model": {"path": str(workdir / "model"), "dtype": dtype},
                # lr 1e-3: Adam turns round-off in near-zero gradients (a key bias gets none
                # in exact arithmetic) into steps of ~lr; the comparison is at 1e-5.
                "actor": {"optim": {"lr": 1e-3}, "strategy": strategy},
                "rollout": {"n": 4},
                "nccl_timeout": timeout,
            },
            "async_training": {"mode": "sync", "max_queue_size": 8, "staleness_threshold": 1},
            "trainer": {
                "total_training_steps": 6,
                "n_gpus_per_node": ranks,
                "default_local_dir": str(out or workdir / "runs"),
                **trainer,
            },
        }
    )


def groups_of_samples(tokenizer, *, groups=3, seed=0):
    """Three groups of four responses of different lengths and mixed rewards."""
    g = torch.Generator().manual_seed(seed)
    digits = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
    out = []
    for k in range(groups):
        prompt = [tokenizer.bos_token_id, *tokenizer(f"{k}+{k + 1}=")["input_ids"]]
        group = []
        for i in range(4):
            length = 1 + int(torch.randint(0, 3, (1,), generator=g))
            response = [digits[int(torch.randint(0, 10, (1,), generator=g))] for _ in range(length)]
            group.append(
                Sample(
                    prompt_token_ids=prompt,
                    response_token_ids=response,
                    response_logprobs=[-2.3] * length,
                    reward=float((i + k) % 2),
                    group_id=f"g{k}",
                    v_start=0,
                )
            )
        out.append(group)
    return out


def fake_cfg(device="auto", ranks=0, nodes=1, strategy="ddp"):
    return SimpleNamespace(
        trainer=SimpleNamespace(device=device, n_gpus_per_node=ranks, nnodes=nodes),
        actor_rollout_ref=SimpleNamespace(
            actor=SimpleNamespace(strategy=strategy), nccl_timeout=30.0
        ),
    )


def test_plan_counts_cpu_ranks_without_cuda_and_says_so():
    plan = group_plan(fake_cfg(ranks=2, nodes=2), cuda_devices=0)
    assert (plan.world_size, plan.device_type, plan.backend) == (4, "cpu", "gloo")
    assert plan.note is not None and "n_gpus_per_node=2 counts CPU ranks" in plan.note
    assert [plan.setup(r).device for r in range(4)] == ["cpu"] * 4
    single = group_plan(fake_cfg(ranks=0), cuda_devices=0)
    assert single.world_size == 1 and single.note is None
    assert group_plan(fake_cfg(device="cpu", ranks=2), cuda_devices=8).device_type == "cpu"
    # CPU ranks share the cores less the rollouter's engine thread, at least one each.
    assert group_plan(fake_cfg(ranks=0), cuda_devices=0, cpu_count=16).cpu_threads == 15
    assert group_plan(fake_cfg(ranks=2), cuda_devices=0, cpu_count=16).cpu_threads == 7
    assert group_plan(fake_cfg(ranks=2), cuda_devices=0, cpu_count=2).cpu_threads == 1


def test_plan_takes_cuda_when_there_is_some_and_refuses_cuda_without_it():
    plan = group_plan(fake_cfg(ranks=2, nodes=2), cuda_devices=2)
    assert (plan.world_size, plan.backend) == (4, "nccl")
    assert [plan.setup(r).device for r in range(4)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    with pytest.raises(ValueError, match=r"trainer\.device='cuda' is invalid"):
        group_plan(fake_cfg(device="cuda", ranks=1), cuda_devices=0)
    with pytest.raises(ValueError, match=r"n_gpus_per_node=4 is invalid: only 2"):
        group_plan(fake_cfg(ranks=4), cuda_devices=2)


def test_an_unknown_strategy_is_refused_naming_the_key(workdir):
    with pytest.raises(ValueError, match=r"strategy"):
        config(workdir, strategy="megatron")


@pytest.fixture
def local_runtime():
    miniray.init(num_workers=1)
    try:
        yield
    finally:
        miniray.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_gloo_ranks_take_the_steps_of_one_rank_on_the_whole_batch(
    workdir, local_runtime, strategy
):
    single = FullyAsyncTrainer(config(workdir))
    batches = [groups_of_samples(single.tokenizer, seed=s) for s in range(3)]
    initial = single.get_weights()
    group = TrainerGroup.start(config(workdir, ranks=2, strategy=strategy))
    try:
        assert (group.world_size, group.device) == (2, "cpu")
        assert group.placement_note is not None  # auto without CUDA says so
        for batch in batches:
            one = single.train_step(batch)
            two = group.train_step(batch)
            assert two["loss"] == pytest.approx(one["loss"], abs=1e-5)
            assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4)
        weights = group.get_weights()
    finally:
        group.close()
    expected = single.get_weights()
    assert set(weights) == set(expected)
    assert weights["lm_head.weight"] is weights["model.embed_tokens.weight"]  # tied: once
    assert any(not torch.equal(expected[k], initial[k]) for k in expected)  # it trained
    for name, value in expected.items():
        torch.testing.assert_close(weights[name], value, atol=1e-5, rtol=0, msg=name)


@pytest.mark.slow
def test_a_killed_rank_ends_the_step_naming_it_and_leaves_no_rank(workdir, local_runtime):
    group = TrainerGroup.start(config(workdir, ranks=2, timeout=20.0))
    pids = list(group.pids)
    batch = groups_of_samples(group.tokenizer) * 8  # long enough to be killed inside a step
    killer = threading.Timer(0.5, os.kill, (pids[1], signal.SIGKILL))
    start = time.monotonic()
    killer.start()
    try:
        with pytest.raises(TrainerRankError) as failure:
            for _ in range(200):
                group.train_step(batch)
    finally:
        killer.cancel()
        group.close()
    elapsed = time.monotonic() - start
    assert failure.value.rank == 1 and failure.value.pid == pids[1]
    assert "trainer rank 1" in str(failure.value)
    assert elapsed < 20.0 + 10.0  # within the configured timeout, not a hang
    wait_until(lambda: gone(pids), timeout=15, what=f"trainer ranks {pids} to exit")


@pytest.mark.slow
def test_published_weights_are_the_ranks_checked_answer_left_in_the_store(
    workdir, local_runtime, tmp_path
):
    """What the loop publishes from a group: a ref to the rank's own answer (no second copy
    in the driver), equal to the weights; NaN found by the rank raises NonFiniteWeightsError
    as itself (a diverged update, not a failed rank), naming the step and the parameter."""
    group = TrainerGroup.start(config(workdir))
    try:
        group.train_step(groups_of_samples(group.tokenizer))
        ref = group.published_weights(1, 0, {"loss": 0.5})
        assert isinstance(ref, miniray.ObjectRef)
        published, expected = miniray.get(ref, timeout=60), group.get_weights()
        assert set(published) == set(expected)
        for name, value in expected.items():
            assert torch.equal(published[name], value), name
        state, tensors = checkpoint.read(group.save_checkpoint(tmp_path / "ckpt", {"step": 1}))
        tensors["model"]["model.norm.weight"][0] = math.nan
        group.load_checkpoint(checkpoint.write(tmp_path / "poisoned", state, tensors))
        with pytest.raises(NonFiniteWeightsError) as info:
            group.published_weights(4, 1, {"loss": math.nan})
    finally:
        group.close()
    assert not isinstance(info.value, TrainerRankError)
    assert (info.value.step, info.value.parameter) == (4, "model.norm.weight")
    assert "steps 2-4 (finite after step 1" in str(info.value)


def grouped_run(workdir, out, *, crash_at=None, **trainer):
    from miniray.rl.loop import run

    cfg = config(workdir, out, ranks=2, **trainer)
    tokenizer = char_tokenizer(TASK.alphabet)
    digits = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]

    def on_step(step, metrics):
        if step == crash_at:
            raise Crash(f"killed at step {step}")

    miniray.init(num_workers=1)
    try:
        return run(
            cfg, reward_fn=reward_by_digit, engine=DeterministicEngine(digits), on_step=on_step
        )
    finally:
        miniray.shutdown()


@pytest.mark.slow
def test_a_two_rank_run_killed_and_resumed_trains_each_prompt_once(workdir, tmp_path):
    out = tmp_path / "crashed"
    with pytest.raises(Crash):
        grouped_run(workdir, out, crash_at=5, save_freq=2)  # checkpoints at steps 2 and 4
    resumed = grouped_run(workdir, out, save_freq=2)
    assert resumed.resumed_from is not None and resumed.resumed_from.endswith("global_step_4")
    assert [m["step"] for m in resumed.history] == [5, 6]
    assert resumed.summary["trainer_world_size"] == 2
    assert resumed.history[0]["trainer_world_size"] == 2
    ckpt_dir = checkpoint.checkpoint_dir(config(workdir, out))
    trainer = FullyAsyncTrainer(config(workdir, out))
    step4 = trainer.load_checkpoint(ckpt_dir / "global_step_4")["data_position"]
    from miniray.rl.data_position import TrainedPositions

    across = collections.Counter(TrainedPositions.from_dict(step4).positions())
    across.update(p for step in resumed.trained_positions for p in step)
    assert across == collections.Counter(range(6 * 2))  # the first 12 prompts, each once
    final = trainer.load_checkpoint(ckpt_dir / "global_step_6")
    assert final["step"] == 6 and trainer.version == 6


@pytest.mark.slow
def test_fsdp2_in_bf16_keeps_fp32_master_shards_and_publishes_bf16(
    workdir, local_runtime, tmp_path
):
    group = TrainerGroup.start(config(workdir, ranks=2, strategy="fsdp2", dtype="bfloat16"))
    try:
        metrics = group.train_step(groups_of_samples(group.tokenizer))
        assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])
        weights = group.get_weights()
        saved = group.save_checkpoint(tmp_path / "ckpt", {"step": 1})
    finally:
        group.close()
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}  # as generated with
    _, tensors = checkpoint.read(saved)
    assert {t.dtype for t in tensors["model"].values()} == {torch.float32}  # the masters
    state = tensors["optimizer"]["state"]
    assert state and all(s["exp_avg"].dtype == torch.float32 for s in state.values())


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_nccl_ranks_on_cuda_take_the_steps_of_one_cpu_rank(workdir, local_runtime, strategy):
    torch.backends.cuda.matmul.allow_tf32 = False
    ranks = min(2, torch.cuda.device_count())
    single = FullyAsyncTrainer(config(workdir))
    batches = [groups_of_samples(single.tokenizer, seed=s) for s in range(3)]
    group = TrainerGroup.start(config(workdir, ranks=ranks, strategy=strategy, device="cuda"))
    try:
        assert group.plan.backend == "nccl" and group.device == "cuda:0"
        for batch in batches:
            single.train_step(batch)
            group.train_step(batch)
        weights = group.get_weights()
    finally:
        group.close()
    for name, value in single.get_weights().items():
        torch.testing.assert_close(weights[name], value, atol=1e-4, rtol=0, msg=name)


@cuda
@pytest.mark.slow
def test_bf16_on_cuda_trains_with_finite_steps(workdir, local_runtime):
    group = TrainerGroup.start(
        config(workdir, ranks=1, strategy="fsdp2", device="cuda", dtype="bfloat16")
    )
    try:
        for seed in range(3):
            metrics = group.train_step(groups_of_samples(group.tokenizer, seed=seed))
            assert math.isfinite(metrics["loss"])
        assert {str(t.dtype) for t in group.get_weights().values()} == {"torch.bfloat16"}
    finally:
        group.close()


# -- the driver's calls: set_version not waited for, a publish's weights call sent early -------
class RecordingRank:
    """Stands in for a rank: records when each call starts (CLOCK_MONOTONIC is one clock for
    every process), takes ``train_s`` per step and ``set_version_s`` per version."""

    def __init__(self, train_s=0.2, set_version_s=0.0):
        self.train_s, self.set_version_s = train_s, set_version_s
        self.calls = []
        self.steps = []  # (groups, version) of each step

    def train_step(self, groups, version=None):
        self.calls.append(("train_step", time.monotonic()))
        self.steps.append((groups, version))
        time.sleep(self.train_s)
        return {"loss": 0.5, "step": len(self.steps)}

    def get_weights(self):
        self.calls.append(("get_weights", time.monotonic()))
        return {"w": torch.ones(3)}

    def publishable_weights(self, step, finite_at, metrics=None, *, extrapolation=0.0):
        self.calls.append(("publishable_weights", time.monotonic()))
        return {"w": torch.full((3,), float(step) + extrapolation)}

    def set_version(self, version):
        self.calls.append(("set_version", time.monotonic()))
        time.sleep(self.set_version_s)
        if version < 0:
            raise ValueError(f"version {version} < 0")
        return version

    def log(self):
        return list(self.calls)

    def steps_log(self):
        return list(self.steps)


def recording_group(timeout_s=30.0, **rank):
    from miniray.rl.trainer_group import GroupPlan

    plan = GroupPlan(
        world_size=1,
        ranks_per_node=1,
        device_type="cpu",
        backend="gloo",
        strategy="ddp",
        timeout_s=timeout_s,
    )
    actor = miniray.remote(RecordingRank).remote(**rank)
    miniray.get(actor.log.remote(), timeout=30)  # started
    return TrainerGroup(plan, [actor], [0], tokenizer=None), actor


def test_set_version_is_not_waited_for_and_its_failure_is_raised_by_the_next_call(local_runtime):
    group, actor = recording_group(set_version_s=0.5)
    started = time.monotonic()
    assert group.set_version(3) == 3 and group.version == 3
    assert time.monotonic() - started < 0.3  # did not wait for the rank's 0.5 s
    assert group.train_step([["g"]]) == {"loss": 0.5, "step": 1}
    assert [name for name, _ in miniray.get(actor.log.remote(), timeout=30)] == [
        "set_version",
        "train_step",
    ]
    group.set_version(-1)
    with pytest.raises(TrainerRankError, match=r"failed in set_version: .*version -1 < 0"):
        group.get_weights()


def test_a_set_version_that_never_answers_fails_the_next_call_within_the_timeout(local_runtime):
    group, _actor = recording_group(timeout_s=1.0, set_version_s=30.0)
    group.set_version(2)
    started = time.monotonic()
    with pytest.raises(TrainerRankError, match=r"did not finish set_version within 1s \(no rank"):
        group.train_step([["g"]])
    assert time.monotonic() - started < 10


def test_a_prepared_publish_sends_the_weights_call_right_behind_the_step(local_runtime):
    group, actor = recording_group(train_s=0.2)
    group.prepare_publish(4, 3)
    group.train_step([["g"]])
    time.sleep(0.3)  # the driver busy elsewhere: the rank has taken the weights already
    asked = time.monotonic()
    ref = group.published_weights(4, 3, {"loss": 0.5})
    assert torch.equal(miniray.get(ref, timeout=30)["w"], torch.full((3,), 4.0))
    log = miniray.get(actor.log.remote(), timeout=30)
    assert [name for name, _ in log] == ["train_step", "publishable_weights"]
    assert log[1][1] < asked  # sent with the step, not when asked
    # A prepared call that is not the one asked for is dropped, and the asked one made.
    group.prepare_publish(5, 4)
    group.train_step([["g"]])
    ref = group.published_weights(5, 4, {"loss": 0.5}, extrapolation=0.5)
    assert torch.equal(miniray.get(ref, timeout=30)["w"], torch.full((3,), 5.5))
    names = [name for name, _ in miniray.get(actor.log.remote(), timeout=30)]
    assert names[2:] == ["train_step", "publishable_weights", "publishable_weights"]
    # Another call between the step and the publish (it may change the weights): dropped.
    group.prepare_publish(7, 6, extrapolation=0.5)
    group.train_step([["g"]])
    group._all("log")
    assert group._prefetched == []
    # The extrapolation asked for is the prepared call's: answered from it.
    group.prepare_publish(6, 5, extrapolation=0.5)
    group.train_step([["g"]])
    ref = group.published_weights(6, 5, {"loss": 0.5}, extrapolation=0.5)
    assert torch.equal(miniray.get(ref, timeout=30)["w"], torch.full((3,), 6.5))
    names = [name for name, _ in miniray.get(actor.log.remote(), timeout=30)]
    assert names[5:] == ["train_step", "publishable_weights"] * 2


def test_a_step_sent_ahead_runs_right_after_the_previous_step_and_its_weights_call(
    local_runtime,
):
    group, actor = recording_group(train_s=0.3)
    group.prepare_publish(1, 0)
    group.send_step([["a"]], 1)
    # Sent ahead, its batch still a ref (the queue's answer), its publish prepared meanwhile.
    group.prepare_publish(2, 1)
    group.send_step(miniray.put([["b"]]), 2)
    with pytest.raises(RuntimeError, match="two steps are in flight"):
        group.send_step([["c"]])
    with pytest.raises(RuntimeError, match=r"log\(\) while 2 step\(s\) are in flight"):
        group._all("log")
    assert group.step_result() == {"loss": 0.5, "step": 1}
    answered = time.monotonic()
    time.sleep(0.2)  # the driver busy elsewhere: the rank goes on with the next step
    # Each publish takes its own step's weights call, sent right behind that step.
    first = group.published_weights(1, 0, {"loss": 0.5})
    assert torch.equal(miniray.get(first, timeout=30)["w"], torch.full((3,), 1.0))
    assert group.step_result() == {"loss": 0.5, "step": 2}
    second = group.published_weights(2, 1, {"loss": 0.5})
    assert torch.equal(miniray.get(second, timeout=30)["w"], torch.full((3,), 2.0))
    log = miniray.get(actor.log.remote(), timeout=30)
    assert [name for name, _ in log] == ["train_step", "publishable_weights"] * 2
    assert log[2][1] < answered + 0.1  # the second step did not wait for the driver
    # The ranks got each step's version with it: no set_version call for the same version.
    assert group.set_version(2) == 2
    assert miniray.get(actor.steps_log.remote(), timeout=30) == [([["a"]], 1), ([["b"]], 2)]
    assert [name for name, _ in miniray.get(actor.log.remote(), timeout=30)][4:] == []
    with pytest.raises(RuntimeError, match="no step was sent"):
        group.step_result()


def test_large_weights_are_answered_verified_and_checked_as_the_answer_is_stored(
    workdir, monkeypatch
):
    import miniray.rl.trainer as trainer_module
    from miniray.runtime import segments, serialization, shm
    from miniray.runtime.local.values import error_of, stored_value, value_of
    from miniray.runtime.serialization import Verified

    monkeypatch.setattr(trainer_module, "CHECK_IN_COPY_MIN_BYTES", 0)  # as for a large model
    # As a large model's too: buffers of 4 KiB or more copied out of band, by two threads.
    monkeypatch.setattr(serialization, "INLINE_LIMIT", 0)
    monkeypatch.setattr(serialization, "COPY_THREADS", 2)
    monkeypatch.setattr(serialization, "PARALLEL_COPY_MIN", 0)
    trainer = FullyAsyncTrainer(config(workdir))
    session = "verifiedrank"
    try:
        answer = trainer.publishable_weights(4, 3, {"loss": 0.5})
        assert isinstance(answer, Verified)  # nothing checked yet: that happens as it is stored
        stored = stored_value(answer, session, "TrainerRank.publishable_weights")
        assert not stored[0] and stored[1].segment is not None  # copied out of band
        back = value_of(stored)
        assert torch.equal(back["model.norm.weight"], trainer.live_weights()["model.norm.weight"])
        del back
        with torch.no_grad():
            trainer.model.get_parameter("model.norm.weight")[0] = math.nan
        # The answer stored is the call's error, naming the step and the parameter; a call
        # that took the answer's ref as its argument (the swap sent with the step) fails too.
        stored = stored_value(trainer.publishable_weights(4, 3), session, "publishable_weights")
        assert stored[0]
        with pytest.raises(NonFiniteWeightsError, match=r"step 4: .*model\.norm\.weight"):
            raise error_of(stored)
        with pytest.raises(NonFiniteWeightsError, match=r"model\.norm\.weight"):
            trainer.publishable_weights(5, 4).full()  # in this process: checked when asked
        # The last entry of the largest tensor (copied out of band, split between the two
        # threads): the loop that copies it finds it.
        largest = max(trainer.live_weights().items(), key=lambda item: item[1].numel())[0]
        with torch.no_grad():
            trainer.model.get_parameter("model.norm.weight")[0] = 1.0
            trainer.model.get_parameter(largest).view(-1)[-1] = -math.inf
        stored = stored_value(trainer.publishable_weights(6, 5), session, "publishable_weights")
        with pytest.raises(NonFiniteWeightsError, match=rf"step 6: .*{re.escape(largest)}"):
            raise error_of(stored)
    finally:
        segments.reset()
        shm.unlink_session(session)


def test_a_rank_publishes_its_weights_extrapolated_along_its_last_published_step(workdir, tmp_path):
    trainer = FullyAsyncTrainer(config(workdir))
    name = "model.norm.weight"
    trained_1 = trainer.live_weights()[name].clone()
    first = trainer.publishable_weights(1, 0, extrapolation=1.0)
    assert torch.equal(first[name], trained_1)  # nothing to extrapolate from yet
    saved = trainer.save_checkpoint(tmp_path / "ckpt", {"step": 1})
    trainer.train_step(groups_of_samples(trainer.tokenizer))
    trained_2 = trainer.live_weights()[name].clone()
    assert not torch.equal(trained_2, trained_1)
    second = trainer.publishable_weights(2, 1, extrapolation=1.0)
    torch.testing.assert_close(second[name], trained_2 + (trained_2 - trained_1))
    assert torch.equal(trainer.live_weights()[name], trained_2)  # the parameters untouched
    # The tied output embedding is the published input embedding, not a second tensor.
    assert second["lm_head.weight"] is second["model.embed_tokens.weight"]
    # Restored weights have no step to extrapolate along: published as they are.
    trainer.load_checkpoint(saved)
    third = trainer.publishable_weights(1, 0, extrapolation=1.0)
    assert torch.equal(third[name], trained_1)


def test_small_weights_are_checked_before_the_answer(workdir):
    import miniray.rl.trainer as trainer_module

    trainer = FullyAsyncTrainer(config(workdir))
    weights = trainer.live_weights()
    assert trainer_module._state_bytes(weights) < trainer_module.CHECK_IN_COPY_MIN_BYTES
    assert isinstance(trainer.publishable_weights(1, 0, {"loss": 0.5}), dict)
    with torch.no_grad():
        trainer.model.get_parameter("model.norm.weight")[0] = math.inf
    with pytest.raises(NonFiniteWeightsError, match=r"step 2: .*model\.norm\.weight"):
        trainer.publishable_weights(2, 1, {"loss": 0.5})


class ValueRollouter:
    """Swaps weights as ``FullyAsyncRollouter`` does with its engine in its own process (by
    value), recording each version loaded, its weights and when."""

    def __init__(self):
        self.loads = []

    def pause_rollout(self):
        return True

    def resume_rollout(self):
        return True

    def load_weights(self, weights, version):
        self.loads.append((version, float(weights["w"][0]), time.monotonic()))
        return True

    def load_weights_from(self, refs, version):
        return self.load_weights(miniray.get(refs[0], timeout=30), version)

    def swap_weights(self, version, *, weights=None, refs=None, timeout=30.0):
        if refs is not None:
            self.load_weights_from(refs, version)
        else:
            self.load_weights(weights, version)
        return {"pause_s": 0.0, "load_s": 0.0, "by_value": True}

    def get_loads(self):
        return list(self.loads)


def publisher_to_a_value_rollouter(extrapolation=0.0):
    """An async ``WeightPublisher`` from a recording group (0.3 s steps) to a ``ValueRollouter``
    actor; returns the publisher, the rank actor and the rollouter."""
    from miniray.rl.weight_publisher import WeightPublisher

    group, actor = recording_group(train_s=0.3)
    rollouter = miniray.remote(ValueRollouter).remote()
    publisher = WeightPublisher(
        group,
        rollouter,
        config={"async_training": {"sync_timeout": 30.0}},
        background=True,
        extrapolation=extrapolation,
        wait_timeout=30.0,
        load_timeout=30.0,
    )
    return publisher, group, actor, rollouter


def test_a_publish_swap_goes_out_with_its_step_and_loads_without_the_driver(local_runtime):
    publisher, group, actor, rollouter = publisher_to_a_value_rollouter(extrapolation=0.5)
    try:
        # The first publish learns how the rollouter takes its weights (by value).
        publisher.prepare(1)
        group.send_step([["a"]], 0)
        publisher.sent(1)
        group.step_result()
        publisher.publish(1, step=1, metrics={"loss": 0.5})
        publisher.wait()
        # From then on the swap goes with the step: the rollouter has the weights (an answer
        # stored is a checked one) while this process waits for nothing, and the publish only
        # collects the sync's answer.
        publisher.prepare(2)
        group.send_step([["b"]], 1)
        publisher.sent(2)
        wait_until(
            lambda: len(miniray.get(rollouter.get_loads.remote(), timeout=30)) == 2,
            what="the second version loaded before its publish",
        )
        assert group.step_result() == {"loss": 0.5, "step": 2}
        publisher.publish(2, step=2, metrics={"loss": 0.5})
        publisher.wait()
        loads = miniray.get(rollouter.get_loads.remote(), timeout=30)
        assert [(v, w) for v, w, _ in loads] == [(1, 1.5), (2, 2.5)]  # the rank's extrapolation
        names = [name for name, _ in miniray.get(actor.log.remote(), timeout=30)]
        assert names == ["train_step", "publishable_weights"] * 2
        stats = publisher.statistics()
        assert stats["sync_count"] == 2 and stats["current_version"] == 2
        # A publish of another version than the one its swap went out as is refused.
        publisher.prepare(3)
        group.send_step([["c"]], 2)
        publisher.sent(3)
        group.step_result()
        with pytest.raises(RuntimeError, match=r"swap went out as version 3"):
            publisher.publish(4, step=3, metrics={"loss": 0.5})
    finally:
        publisher.close()


@pytest.mark.parametrize("newer_torch", [True, False])
def test_ddp_syncs_no_buffers_per_forward_under_the_name_the_torch_takes(monkeypatch, newer_torch):
    # torch 2.13 deprecates broadcast_buffers (a FutureWarning from every rank) for
    # forward_sync_buffers; earlier versions only know broadcast_buffers.
    import inspect as inspect_module

    import torch.nn.parallel

    from miniray.rl.parallel import RankSetup, wrap

    made = []

    class Newer:
        def __init__(
            self, module, device_ids=None, broadcast_buffers=None, forward_sync_buffers=None
        ):
            made.append(
                {
                    "broadcast_buffers": broadcast_buffers,
                    "forward_sync_buffers": forward_sync_buffers,
                }
            )

    class Older:
        def __init__(self, module, device_ids=None, broadcast_buffers=True):
            made.append({"broadcast_buffers": broadcast_buffers})

    real = torch.nn.parallel.DistributedDataParallel
    assert "forward_sync_buffers" in inspect_module.signature(real.__init__).parameters  # 2.13
    monkeypatch.setattr(
        torch.nn.parallel, "DistributedDataParallel", Newer if newer_torch else Older
    )
    wrap(torch.nn.Linear(2, 2), RankSetup(rank=0, world_size=2), compute_dtype=torch.float32)
    if newer_torch:
        assert made == [{"broadcast_buffers": None, "forward_sync_buffers": False}]
    else:
        assert made == [{"broadcast_buffers": False}]
