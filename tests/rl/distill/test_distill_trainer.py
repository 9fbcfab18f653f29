"""DistillTrainer on a real tiny student against an in-process teacher, and a whole run."""

from __future__ import annotations

import copy
import os
import signal
import threading
import time

import pytest
import torch
from distill_models import make_models

import miniray
from miniray.rl.distill.config import load_distill_config
from miniray.rl.distill.local_teacher import LocalTeacher
from miniray.rl.distill.loop import run_distillation
from miniray.rl.distill.trainer import DistillBatch, DistillTrainer, build_inputs, response_mask
from miniray.rl.errors import RolloutWeightSyncError
from miniray.rl.models.tiny import load


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_models(tmp_path_factory.mktemp("distill"))


@pytest.fixture(scope="module")
def teacher(models):
    t = LocalTeacher(model_path=str(models["teacher"]))
    yield t
    t.close()


def _batch(tokenizer, *, on_policy=True):
    prompts = ["3+4=", "12+9=", "0+0="]  # '12' is two tokens: prompts differ in length
    answers = ["7", "21", "0"]
    seqs, plens = [], []
    for p, a in zip(prompts, answers):
        prompt = [tokenizer.bos_token_id, *tokenizer(p)["input_ids"]]
        seqs.append([*prompt, *tokenizer(a)["input_ids"], tokenizer.eos_token_id])
        plens.append(len(prompt))
    return DistillBatch(
        batch_index=0,
        sequences=seqs,
        prompt_lengths=plens,
        answers=answers,
        on_policy=on_policy,
        version=0,
    )


def _trainer(models, **kwargs):
    model, tokenizer = load(models["student"])
    kwargs.setdefault("lr", 1e-2)
    return DistillTrainer(model, pad_token_id=tokenizer.pad_token_id, **kwargs), tokenizer


def test_response_mask_selects_rows_that_predict_response_tokens():
    # sequence of 6 tokens, prompt of 4: rows 3 and 4 predict tokens 4 and 5.
    mask = response_mask([6, 4], [4, 2], width=5)
    assert mask.tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 0, 0]]
    ids, attention, m = build_inputs([[1, 2, 3], [4, 5]], [2, 1], pad_token_id=0)
    assert ids.tolist() == [[1, 2, 3], [4, 5, 0]]
    assert attention.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert m.tolist() == [[0, 1], [1, 0]]
    with pytest.raises(ValueError, match=r"prompt_lengths\[0\]=5 is invalid"):
        DistillBatch(
            batch_index=0, sequences=[[1, 2]], prompt_lengths=[5], answers=["x"], on_policy=True,
            version=0,
        )  # fmt: skip


def test_training_steps_move_the_student_to_the_teacher(models, teacher):
    trainer, tokenizer = _trainer(models, loss="reverse_kl")
    batch = _batch(tokenizer)
    scores = teacher.score(batch.sequences, topk=trainer.vocab_size, timeout=30)
    before = trainer.divergence(batch, scores)
    metrics = [trainer.train_step(batch, scores) for _ in range(25)]
    after = trainer.divergence(batch, scores)
    assert after < 0.3 * before, (before, after)
    assert trainer.version == 25
    m = metrics[0]
    assert m["num_tokens"] == 2 + 3 + 2  # responses '7</s>', '21</s>', '0</s>'
    assert m["teacher_topk_mass"] == pytest.approx(1.0, abs=1e-4)
    assert m["on_policy"] == 1.0 and "sampled_reverse_kl" in m
    assert metrics[-1]["loss"] < m["loss"]


def test_micro_batches_give_the_same_step_as_the_whole_batch(models, teacher):
    whole, tokenizer = _trainer(models, loss="jsd", beta=0.3)
    micro = copy.deepcopy(whole)
    micro.micro_batch_size = 1
    batch = _batch(tokenizer)
    scores = teacher.score(batch.sequences, topk=8, timeout=30)
    a = whole.train_step(batch, scores)
    b = micro.train_step(batch, scores)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    # The gradients are equal (compared before Adam, whose first step is ~lr * sign(grad)).
    for (name, p), q in zip(whole.model.named_parameters(), micro.model.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-7), name


def test_partial_or_mismatched_scores_are_refused(models, teacher):
    trainer, tokenizer = _trainer(models)
    batch = _batch(tokenizer, on_policy=False)
    scores = teacher.score(batch.sequences, topk=4, timeout=30)
    m = trainer.train_step(batch, scores)
    assert m["on_policy"] == 0.0 and "sampled_reverse_kl" not in m
    scores.missing = [1]
    with pytest.raises(ValueError, match=r"did not score sequences \[1\]"):
        trainer.train_step(batch, scores)
    no_topk = teacher.score(batch.sequences, topk=0, timeout=30)
    with pytest.raises(ValueError, match="no top-k log-probs"):
        trainer.train_step(batch, no_topk)


def _config(models, *overrides):
    return load_distill_config(
        overrides=[
            f"actor_rollout_ref.model.path={models['student']}",
            f"data.train_files={models['train']}",
            f"data.val_files={models['test']}",
            "data.train_batch_size=8",
            "data.max_response_length=3",
            "actor_rollout_ref.teacher.topk=0",
            "actor_rollout_ref.actor.optim.lr=5e-3",
            "distill.loss=reverse_kl",
            "rollout.n_gpus_per_node=2",
            "actor_rollout_ref.nccl_timeout=60",
            "trainer.generation_timeout=120",
            *overrides,
        ]
    )


@pytest.mark.slow
def test_a_run_trains_every_batch_once_one_step_off_with_two_rollout_workers(
    models, teacher, tmp_path
):
    cfg = _config(models, "trainer.total_training_steps=12", "trainer.scheduler=one_step_off")
    result = run_distillation(cfg, teacher=teacher, log_dir=tmp_path)
    h = result.history
    assert [m["batch"] for m in h] == list(range(12))
    assert [m["staleness"] for m in h] == [0] + [1] * 11
    assert [m["gen_version"] for m in h] == [0, 0, *range(1, 11)]
    s = result.summary
    assert s["steps"] == 12 and s["max_staleness"] == 1 and s["on_policy_batches"] == 12
    assert s["rollout_workers"] == 2
    assert s["final_reverse_kl"] < s["initial_reverse_kl"]
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 12
    # The workers' pool: together they generated every prompt once (each worker pulls chunks
    # of ceil(8 / 4x2) = 1 prompt), took every sync, missed none, failed never.
    workers = result.rollout_stats
    assert [w["name"] for w in workers] == ["rollout_worker_0", "rollout_worker_1"]
    assert sum(w["groups"] for w in workers) == 12 * 8
    assert all(w["groups"] > 0 and w["tokens_per_s"] > 0 for w in workers)
    assert all(w["node"] is not None for w in workers)
    assert [(w["loaded_version"], w["missed_syncs"]) for w in workers] == [(10, 0), (10, 0)]
    assert [(w["failures"], w["last_failure"]) for w in workers] == [(0, None), (0, None)]


@pytest.mark.slow
def test_a_rollout_worker_killed_mid_run_fails_the_next_sync_naming_it(
    models, teacher, monkeypatch
):
    from miniray.rl.distill import loop

    pools = []
    start_workers = loop._start_workers
    monkeypatch.setattr(
        loop, "_start_workers", lambda cfg: pools.append(start_workers(cfg)) or pools[-1]
    )

    def kill_worker_1(record, metrics):
        if record.batch_index == 1:
            miniray.kill(pools[0].handle(1))

    cfg = _config(models, "trainer.total_training_steps=6", "trainer.scheduler=serial")
    with pytest.raises(RolloutWeightSyncError, match=r"rollout_worker_1: died") as info:
        run_distillation(cfg, teacher=teacher, eval_rows=[], on_step=kill_worker_1)
    assert list(info.value.failures) == ["rollout_worker_1"]
    stats = pools[0].statistics(1.0)
    assert [s["missed_syncs"] for s in stats] == [0, 1]
    assert stats[1]["loaded_version"] == 1  # the sync before batch 1, its last


@pytest.mark.slow
def test_a_rollout_worker_killed_mid_batch_is_restarted_and_every_batch_trains_once(
    models, teacher, monkeypatch
):
    """SIGKILL worker 1 as soon as it has answered its first chunk (it has more of batch 0 to
    pull): its chunk goes to worker 0, it is restarted, and the run goes on, each batch
    generated and trained exactly once, the restarted worker taking every later sync."""
    from miniray.rl.distill import loop

    pools, stop = [], threading.Event()
    start_workers = loop._start_workers

    def kill_worker_1_mid_batch():
        while not pools and not stop.is_set():
            time.sleep(0.005)
        pid = miniray.get(pools[0].handle(1).ping.remote(), timeout=60)["pid"]
        while pools[0].stats[1]["groups"] == 0 and not stop.is_set():
            time.sleep(0.002)
        os.kill(pid, signal.SIGKILL)

    monkeypatch.setattr(
        loop, "_start_workers", lambda cfg: pools.append(start_workers(cfg)) or pools[-1]
    )
    killer = threading.Thread(target=kill_worker_1_mid_batch, daemon=True)
    killer.start()
    cfg = _config(models, "trainer.total_training_steps=4", "trainer.scheduler=one_step_off")
    try:
        result = run_distillation(cfg, teacher=teacher, eval_rows=[])
    finally:
        stop.set()
        killer.join(10)
    assert [m["batch"] for m in result.history] == [0, 1, 2, 3]
    assert [m["staleness"] for m in result.history] == [0, 1, 1, 1]
    workers = result.rollout_stats
    assert sum(w["groups"] for w in workers) == 4 * 8  # the killed chunk counted once
    assert [w["failures"] for w in workers] == [0, 1]
    assert workers[1]["last_failure"].startswith("died")
    assert [w["loaded_version"] for w in workers] == [2, 2]  # the restarted one took the syncs
    assert result.summary["rollout_worker_failures"] == 1
    assert pools[0].restarts == 1


@pytest.mark.slow
def test_lmbda_zero_trains_on_ground_truth_only_and_serial_is_on_policy(models, teacher):
    cfg = _config(
        models,
        "trainer.total_training_steps=4",
        "trainer.scheduler=serial",
        "distill.lmbda=0",
        "rollout.n_gpus_per_node=1",
    )
    result = run_distillation(cfg, teacher=teacher, eval_rows=[])
    assert result.summary["on_policy_batches"] == 0
    assert [m["staleness"] for m in result.history] == [0, 0, 0, 0]
    assert all("sampled_reverse_kl" not in m for m in result.history)


def test_a_chunk_seed_makes_a_workers_responses_independent_of_the_worker(models):
    """Two workers with different seeds and histories answer a chunk alike under its seed
    (``dispatch.chunk_seed``), so it does not matter which one pulled it or whether it was
    redone after a failure."""
    from miniray.rl.distill.rollout_worker import RolloutWorker

    a = RolloutWorker(str(models["student"]), seed=0)
    b = RolloutWorker(str(models["student"]), seed=9)
    prompts = [[1, 5, 6, 7], [1, 8, 9], [1, 4]]
    kwargs = {"max_new_tokens": 8, "temperature": 1.0}
    a.generate([[1, 5]], **kwargs)  # a different history
    _, first = a.generate(prompts, seed=1234, **kwargs)
    _, second = b.generate(prompts, seed=1234, **kwargs)
    assert [g.response_token_ids for g in first] == [g.response_token_ids for g in second]
    _, other = b.generate(prompts, seed=4321, **kwargs)
    assert [g.response_token_ids for g in other] != [g.response_token_ids for g in first]
