"""The config tree of on-policy distillation (GKD): student, teacher server, loss, scheduler.

Key names follow verl's GKD recipe (``recipe/gkd/config/on_policy_distill_trainer.yaml``; seed
003 shows them), so the seed's command line works unchanged::

    python -m miniray.rl.distill.main --config-name=on_policy_distill_trainer \\
        actor_rollout_ref.model.path=STUDENT data.train_files=train.parquet \\
        trainer.total_epochs=1 trainer.n_gpus_per_node=1 rollout.n_gpus_per_node=3 \\
        actor_rollout_ref.teacher.server_ip=127.0.0.1 actor_rollout_ref.teacher.server_port=15555 \\
        actor_rollout_ref.nccl_timeout=300 trainer.scheduler=one_step_off

The loss options verl hides behind ``+actor_rollout_ref.actor.distill_loss.*`` are a plain
section here, ``distill.{loss,beta,temperature,lmbda}``. Sections shared with the RL recipe
(``data``, ``rollout``, ``actor_rollout_ref.actor.optim``) reuse its dataclasses. The bundled
``configs/on_policy_distill_trainer.yaml`` lists every key with its default; a test keeps the
two equal. Unknown keys are errors that name the key and the closest valid one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from miniray.config import Config, load, option
from miniray.rl.config import DataConfig, OptimConfig, ReplicaRolloutConfig
from miniray.rl.config_loading import config_file, split_config_args
from miniray.rl.config_reads import SCALE_OUT, Refusal, at_most, check_refused

__all__ = [
    "DEFAULT_CONFIG_NAME",
    "DistillActorConfig",
    "DistillActorRolloutRefConfig",
    "DistillConfig",
    "DistillLossConfig",
    "DistillRolloutSamplingConfig",
    "DistillTrainerConfig",
    "StudentModelConfig",
    "TeacherConfig",
    "load_distill_config",
    "parse_distill_args",
]

DEFAULT_CONFIG_NAME = "on_policy_distill_trainer"


@dataclass(kw_only=True)
class StudentModelConfig(Config):
    path: str = option(help="the student: a Hugging Face causal LM in a local directory")


@dataclass(kw_only=True)
class TeacherConfig(Config):
    """Where the teacher server is, how to talk to it, and (optionally) how to start it."""

    server_ip: str = option("127.0.0.1", help="host of the teacher server")
    server_port: int = option(
        15555, ge=0, le=65535, help="port of the teacher server; 0 with launch=true: any free port"
    )
    n_server_workers: int = option(
        1, ge=1, help="model processes of a launched server (each scores requests in parallel)"
    )
    num_microbatches: int = option(
        1, ge=1, help="requests one batch is split into (they are in flight at the same time)"
    )
    topk: int = option(
        256,
        ge=0,
        help="teacher tokens per position the loss sees (renormalised on them); 0 = the whole "
        "vocabulary (exact; small vocabularies only); capped at the vocabulary size",
    )
    token: str | None = option(None, help="shared secret the server checks; None: no check")
    request_timeout: float = option(60.0, gt=0, help="seconds one teacher request may take")
    max_retries: int = option(1, ge=0, help="re-sends of a request that timed out")
    launch: bool = option(
        False, help="start a teacher server from model_path (else connect to server_ip:port)"
    )
    model_path: str | None = option(None, help="the teacher model directory, for launch=true")
    ready_timeout: float = option(120.0, gt=0, help="seconds a launched server may take to start")
    num_threads: int | None = option(
        None,
        ge=1,
        help="torch threads per worker of a launched server; None: the CPUs / n_server_workers "
        "(set 1 when the student generates and trains on the same few cores)",
    )

    def validate(self) -> None:
        if self.server_port == 0 and not self.launch:
            raise ValueError(
                f"{self.key('server_port')}=0 is invalid with {self.key('launch')}=false: "
                "port 0 (any free port) only makes sense for a server this run starts"
            )
        if self.launch and not self.model_path:
            raise ValueError(
                f"{self.key('model_path')}=None is invalid with {self.key('launch')}=true: "
                "a launched teacher server needs the teacher model's directory"
            )


@dataclass(kw_only=True)
class DistillActorConfig(Config):
    """The student's update."""

    optim: OptimConfig = field(default_factory=OptimConfig)
    micro_batch_size: int | None = option(
        None,
        ge=1,
        help="sequences per forward/backward; the loss is still the mean over the whole "
        "batch's response tokens (TRL #4719); None: the whole batch at once",
    )


@dataclass(kw_only=True)
class DistillRolloutSamplingConfig(Config):
    """How the student samples its responses (the loss temperature is distill.temperature)."""

    name: Literal["transformers"] = option(
        "transformers", help="generation engine of the rollout workers"
    )
    temperature: float = option(1.0, ge=0, help="sampling temperature; 0 is greedy")


@dataclass(kw_only=True)
class DistillActorRolloutRefConfig(Config):
    model: StudentModelConfig
    actor: DistillActorConfig = field(default_factory=DistillActorConfig)
    rollout: DistillRolloutSamplingConfig = field(default_factory=DistillRolloutSamplingConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    nccl_timeout: float = option(
        600.0,
        gt=0,
        help="seconds each side of a rollout weight sync may take (trainer export, worker "
        "load); past it the sync raises instead of hanging",
    )


@dataclass(kw_only=True)
class DistillLossConfig(Config):
    """The GKD objective: which divergence, and how many batches are on-policy."""

    loss: Literal["forward_kl", "reverse_kl", "jsd"] = option(
        "jsd", help="forward_kl = KL(teacher||student), reverse_kl = KL(student||teacher)"
    )
    beta: float = option(
        0.5, ge=0, le=1, help="jsd interpolation: 0 is forward KL, 1 is reverse KL"
    )
    temperature: float = option(
        1.0, gt=0, help="divides student logits and teacher log-probs in the loss"
    )
    lmbda: float = option(
        1.0,
        ge=0,
        le=1,
        help="fraction of batches trained on the student's own generations; the rest use the "
        "dataset's ground-truth responses",
    )
    seed: int = option(0, help="seeds the lmbda draws")


@dataclass(kw_only=True)
class DistillTrainerConfig(Config):
    """The training loop: length, schedule, resources, outputs."""

    scheduler: Literal["serial", "one_step_off", "two_step_off"] = option(
        "one_step_off",
        help="how far generation runs ahead of training (staleness bound 0, 1, 2)",
    )
    total_epochs: int = option(1, ge=1, help="passes over data.train_files")
    total_training_steps: int | None = option(
        None, ge=1, help="stop after this many steps; None: total_epochs decide"
    )
    generation_timeout: float = option(
        600.0,
        gt=0,
        help="seconds a rollout worker may take for one chunk of a batch (about B / 4R "
        "prompts); past it the worker is restarted and the chunk goes to the others",
    )
    nnodes: int = option(1, ge=1)
    n_gpus_per_node: int = option(
        0, ge=0, help="GPUs for the trainer; 0 (or no CUDA) trains on the CPU"
    )
    test_freq: int = option(0, ge=0, help="steps between held-out evaluations; 0: start and end")
    project_name: str = "miniray_distill"
    experiment_name: str = "on_policy_distill"
    default_local_dir: str = option("runs", help="runs/<experiment_name>/ gets the metrics")
    seed: int = 0


@dataclass(kw_only=True)
class DistillConfig(Config):
    """The whole tree; ``data.train_files`` and ``actor_rollout_ref.model.path`` are required."""

    data: DataConfig
    actor_rollout_ref: DistillActorRolloutRefConfig
    distill: DistillLossConfig = field(default_factory=DistillLossConfig)
    trainer: DistillTrainerConfig = field(default_factory=DistillTrainerConfig)
    # rollout.max_restarts: the RL rollouter's key, read the same way (distill/loop.py)
    rollout: ReplicaRolloutConfig = field(default_factory=ReplicaRolloutConfig)

    def validate(self) -> None:
        check_refused(self, DISTILL_REFUSED)

    @property
    def num_rollout_workers(self) -> int:
        """On the CPU each of ``rollout.n_gpus_per_node`` is one rollout worker process."""
        return max(1, self.rollout.nnodes * self.rollout.n_gpus_per_node)


# Keys accepted only at the values this version supports (``check_refused``). The rollout's
# nnodes * n_gpus_per_node is its number of worker processes, so those two are read, not refused.
DISTILL_REFUSED: dict[str, Refusal] = {
    "trainer.nnodes": at_most(1, SCALE_OUT),
    "trainer.n_gpus_per_node": at_most(
        1, "the student trains in one process, on one GPU (or the CPU); " + SCALE_OUT
    ),
}


def load_distill_config(
    config_name: str | Path = DEFAULT_CONFIG_NAME,
    *,
    overrides: Sequence[str] = (),
    data: Mapping[str, Any] | None = None,
) -> DistillConfig:
    """Dataclass defaults <- a bundled config name or a YAML path <- ``data`` <- overrides."""
    path = config_file(config_name, [DEFAULT_CONFIG_NAME])
    return load(DistillConfig, path, data=data, overrides=overrides)


def parse_distill_args(argv: Sequence[str]) -> DistillConfig:
    """``--config-name=NAME [--config-path=DIR] key=value ...`` (Hydra-style, as in the seed)."""
    name, overrides = split_config_args(argv, DEFAULT_CONFIG_NAME)
    return load_distill_config(name, overrides=overrides)
