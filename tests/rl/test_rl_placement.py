"""Where rollout replicas generate: the plan (``replica_placement``, pure), the device a process
numbers as its own (``visible_device``), the rule that the trainer's GPUs come first, the
planned device reaching each replica's engine, and (on CUDA only) an engine on a GPU."""

from __future__ import annotations

import pytest
import torch
from rl_fakes import PacedEngines

import miniray
from miniray.rl import replicas
from miniray.rl.config import ReplicaRolloutConfig
from miniray.rl.distill.config import load_distill_config
from miniray.rl.distill.loop import _worker_placement
from miniray.rl.engines import HFGenerationEngine
from miniray.rl.models import char_tokenizer, tiny_qwen2
from miniray.rl.placement import ReplicaPlacement, replica_placement, visible_device
from miniray.rl.replicas import replica_options, rollout_placement
from miniray.rl.rollouter import FullyAsyncRollouter, as_rl_config
from miniray.rl.tasks import ArithmeticTask, write_prompts

TASK = ArithmeticTask(max_operand=9)


def rollout(per_node, device="auto", nnodes=1):
    return ReplicaRolloutConfig(nnodes=nnodes, n_gpus_per_node=per_node, device=device)


def plan(per_node, *, cuda, trainer=0, device="auto", single_node=True, nnodes=1):
    return replica_placement(
        rollout(per_node, device, nnodes),
        cuda_devices=cuda,
        trainer_gpus=trainer,
        single_node=single_node,
    )


def test_replicas_generate_on_the_cpu_without_cuda_or_a_gpu_count_or_when_asked():
    for placement in (plan(0, cuda=0), plan(0, cuda=8), plan(2, cuda=8, device="cpu")):
        assert placement.device_type == "cpu" and placement.num_gpus == 0
        assert [placement.device(i) for i in range(2)] == ["cpu", "cpu"]
        assert replica_options(placement)["num_gpus"] == 0
    assert plan(0, cuda=0).note is None and plan(0, cuda=8).note is None
    assert "n_gpus_per_node=3 counts CPU processes (no CUDA device" in plan(3, cuda=0).note
    assert "device='cpu'" in plan(2, cuda=8, device="cpu").note


def test_on_cuda_each_replica_has_its_own_gpu_after_the_trainers():
    placement = plan(2, cuda=4, trainer=2)
    assert placement.device_type == "cuda" and placement.note is None
    assert [placement.device(i) for i in range(2)] == ["cuda:2", "cuda:3"]
    assert replica_options(placement) == {
        "num_cpus": 1,
        "num_gpus": 1,
        "scheduling_strategy": "SPREAD",
    }
    assert [plan(2, cuda=2).device(i) for i in range(2)] == ["cuda:0", "cuda:1"]
    # Several nodes: Ray gives each replica its GPU; nothing to count on the driver's node.
    spread = plan(8, cuda=8, trainer=8, single_node=False, nnodes=2)
    assert [spread.device(i) for i in (0, 7, 8, 15)] == ["cuda:0", "cuda:7", "cuda:0", "cuda:7"]


def test_cuda_asked_for_and_not_possible_is_an_error_naming_the_key(tmp_path):
    cfg = config(tmp_path, 2)
    cfg.rollout.device = "cuda"
    with pytest.raises(ValueError, match=r"rollout\.device='cuda' is invalid here: no CUDA"):
        replica_placement(cfg.rollout, cuda_devices=0, trainer_gpus=0, single_node=True)
    cfg.rollout.n_gpus_per_node = 0
    with pytest.raises(ValueError, match=r"rollout\.n_gpus_per_node=0 is invalid with"):
        replica_placement(cfg.rollout, cuda_devices=2, trainer_gpus=0, single_node=True)
    cfg.rollout.n_gpus_per_node, cfg.rollout.device = 2, "auto"
    with pytest.raises(ValueError, match=r"after the trainer's 2, which needs 4 CUDA devices.*3"):
        replica_placement(cfg.rollout, cuda_devices=3, trainer_gpus=2, single_node=True)


def test_a_planned_gpu_as_the_replicas_process_numbers_it():
    assert visible_device("cpu", 0) == "cpu"
    assert visible_device("cuda:3", 4) == "cuda:3"  # an embedded backend's actor sees them all
    assert visible_device("cuda:3", 1) == "cuda:0"  # a Ray actor sees the GPU it was given
    with pytest.raises(RuntimeError, match=r"placed on cuda:1 but sees no CUDA device"):
        visible_device("cuda:1", 0)


@pytest.fixture
def four_gpus(monkeypatch):
    """The driver sees four CUDA devices (only the plan is made: nothing runs on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)


def config(root, per_node, **trainer):
    return as_rl_config(
        {
            "data": {"train_files": [str(root / "train.parquet")], "train_batch_size": 2},
            "actor_rollout_ref": {"model": {"path": str(root / "model")}, "rollout": {"n": 2}},
            "rollout": {"n_gpus_per_node": per_node},
            "async_training": {"max_queue_size": 8},
            "trainer": trainer,
        }
    )


def test_the_trainer_ranks_on_cuda_take_the_first_gpus(four_gpus, tmp_path):
    at = rollout_placement(config(tmp_path, 2, n_gpus_per_node=1))
    assert [at.device(i) for i in range(2)] == ["cuda:1", "cuda:2"]
    on_cpu = rollout_placement(config(tmp_path, 2, n_gpus_per_node=1, device="cpu"))
    assert [on_cpu.device(i) for i in range(2)] == ["cuda:0", "cuda:1"]
    with pytest.raises(ValueError, match=r"needs 5 CUDA devices on this node and 4"):
        rollout_placement(config(tmp_path, 2, n_gpus_per_node=3))
    assert rollout_placement(config(tmp_path, 0, n_gpus_per_node=1)).device_type == "cpu"


def test_the_distillation_workers_come_after_the_students_gpu(four_gpus):
    required = ["actor_rollout_ref.model.path=/m", "data.train_files=t.parquet"]
    cfg = load_distill_config(
        overrides=[*required, "trainer.n_gpus_per_node=1", "rollout.n_gpus_per_node=3"]
    )
    at = _worker_placement(cfg)
    assert [at.device(i) for i in range(3)] == ["cuda:1", "cuda:2", "cuda:3"]
    cfg = load_distill_config(overrides=[*required, "rollout.n_gpus_per_node=2"])
    assert [_worker_placement(cfg).device(i) for i in range(2)] == ["cuda:0", "cuda:1"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("placement")
    tokenizer = char_tokenizer(TASK.alphabet)
    torch.manual_seed(0)
    from miniray.rl.models import save

    save(tiny_qwen2(tokenizer, hidden_size=32, intermediate_size=64), tokenizer, root / "model")
    write_prompts(TASK.rows(20), root / "train.parquet")
    return root


def test_each_replica_builds_its_engine_on_its_planned_device(workdir, monkeypatch):
    built = []

    def engine(cfg, index, seed, factory=None, *, device="cpu"):
        built.append((index, device))
        return PacedEngines([1], [0.0, 0.0])(index)

    monkeypatch.setattr(replicas, "replica_engine", engine)
    miniray.init(backend="inline")  # replicas are threads here: the patch reaches them
    try:
        rollouter = FullyAsyncRollouter(
            config(workdir, 2), placement=ReplicaPlacement("cuda", first_gpu=1, per_node=2)
        )
        rollouter.pool.shutdown()
    finally:
        miniray.shutdown()
    assert sorted(built) == [(0, "cuda:1"), (1, "cuda:2")]
    built.clear()
    FullyAsyncRollouter(config(workdir, 1), placement=ReplicaPlacement("cuda", first_gpu=3))
    assert built == [(0, "cuda:3")]  # one replica: the rollouter's own engine


def test_a_cpu_engine_keeps_its_inputs_and_sampler_with_the_model(workdir):
    engine = HFGenerationEngine(model_path=workdir / "model", device="cpu")
    assert engine.device.type == "cpu" and engine.generator.device.type == "cpu"
    (gen,) = engine.generate([[1, 2, 3]], max_new_tokens=3, temperature=0)
    assert len(gen.response_token_ids) >= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_an_engine_on_a_gpu_samples_what_the_cpu_samples_and_loads_cpu_weights(workdir):
    torch.backends.cuda.matmul.allow_tf32 = False
    cpu = HFGenerationEngine(model_path=workdir / "model", device="cpu")
    gpu = HFGenerationEngine(model_path=workdir / "model", device="cuda:0")
    assert gpu.device.type == "cuda" and gpu.generator.device.type == "cuda"
    prompts = [[1, 2, 3], [4, 5]]

    def greedy(engine):
        return [
            g.response_token_ids for g in engine.generate(prompts, max_new_tokens=4, temperature=0)
        ]

    assert greedy(gpu) == greedy(cpu)
    # Published weights arrive as CPU tensors: the engine copies them onto its GPU.
    changed = {k: v + 0.01 * torch.randn_like(v) for k, v in cpu.state_dict().items()}
    cpu.load_weights({k: v.clone() for k, v in changed.items()}, take=True)
    gpu.load_weights(changed, take=True)
    assert all(p.device.type == "cuda" for p in gpu.model.parameters())
    assert greedy(gpu) == greedy(cpu)
    sampled = gpu.generate(prompts, max_new_tokens=4, temperature=1.0)
    assert all(len(g.response_logprobs) == len(g.response_token_ids) for g in sampled)
