"""The config tree of fully asynchronous RL.

Sections: async_training, data, trainer, rollout, actor_rollout_ref, algorithm.

Key names follow verl's ``fully_async_policy`` recipe (the seeds show them), so that a verl user's
command line ``async_training.max_queue_size=500 data.train_batch_size=4`` works unchanged. Two
places deliberately differ from verl, and the error for the verl spelling points here:

* ``async_training.staleness_threshold`` is an integer version lag ``k`` (a sample with
  ``age = v_trainer_now - v_start > k`` is never trained on), not verl's fractional budget.
* ``trigger_parameter_sync_step`` lives under ``trainer`` (it is the trainer's publishing cadence).

The documented defaults are ``configs/fully_async_ppo.yaml``; a test keeps it equal to the
dataclass defaults below.

Loading it is ``config_loading`` (``load_rl_config``, ``parse_rl_args``); which keys the code
reads, and the values refused, ``config_reads``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from miniray.config import Config, option
from miniray.rl.config_reads import SCALE_OUT, Refusal, at_most, check_refused

__all__ = [
    "CONFIG_DIR",
    "REFUSED",
    "ActorConfig",
    "ActorRolloutRefConfig",
    "AlgorithmConfig",
    "AsyncTrainingConfig",
    "DataConfig",
    "ModelConfig",
    "MultiTurnConfig",
    "OptimConfig",
    "RLConfig",
    "RolloutConfig",
    "RolloutSamplingConfig",
    "TrainerConfig",
]

CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_CONFIG_NAME = "fully_async_ppo"


@dataclass(kw_only=True)
class AsyncTrainingConfig(Config):
    """How generation and training overlap: staleness bound, queue, weight sync."""

    mode: Literal["async", "sync"] = option(
        "async",
        help="async: rollouter and trainer run at the same time; sync: generate, then train "
        "(the baseline the speedup is measured against)",
    )
    staleness_threshold: int = option(
        3,
        ge=0,
        help="k: a sample with age = v_trainer_now - v_start > k is never trained on; "
        "0 is strictly on-policy (an integer version lag, not verl's fraction)",
    )
    max_queue_size: int = option(1000, ge=1, help="most items the message queue holds")
    max_concurrent_rollouts: int = option(
        16, ge=1, help="most generations in flight in the rollouter (admission control)"
    )
    partial_rollout: bool = option(
        True,
        help="on a weight sync, interrupt generations and continue them with the new weights "
        "(then v_end > v_start) instead of waiting for them to finish",
    )
    pause_grace_s: float = option(
        0.0,
        ge=0,
        help="a pause lets the running engine call end on its own for up to this many seconds "
        "before interrupting it: short calls then finish whole (a continued partial rollout "
        "encodes its prompt again) while long ones are still cut; 0: interrupt at once",
    )
    resume_on_load: bool = option(
        False,
        help="the rollouter resumes as soon as a weight load succeeds, a round trip before the "
        "synchronizer's resume_rollout (which then finds it running); false: only "
        "resume_rollout resumes it",
    )
    weight_extrapolation: float = option(
        0.0,
        ge=0,
        help="async: publish theta + c * (theta - theta_before_the_step), a guess of the "
        "weights the samples will be trained at (c=1: one step ahead, the typical age at "
        "staleness_threshold=1); the behaviour log-probs are the guess's, so the importance "
        "weights stay exact. 0: publish theta",
    )
    max_sync_retries: int = option(
        3, ge=0, help="extra attempts after a failed weight sync (attempts = 1 + retries)"
    )
    sync_timeout: float = option(
        30.0, gt=0, help="seconds one weight sync may take, all attempts together"
    )
    sync_retry_delay: float = option(1.0, ge=0, help="seconds between sync attempts")
    sync_monitor_interval: float = option(
        60.0, gt=0, help="a sync is reported overdue when none succeeded for this many seconds"
    )
    generation_timeout: float = option(
        30.0,
        gt=0,
        allow_inf=True,
        help="seconds the trainer waits for a batch (and for each call to the rollouter and "
        "queue) before reporting it stuck; inf: no deadline (a dead rollouter is still "
        "reported at once)",
    )


@dataclass(kw_only=True)
class DataConfig(Config):
    """Prompts: where they come from and how many go into one training step."""

    # option() returns a dataclasses.field; ruff only knows field() by name (RUF009).
    train_files: list[str] = option(help="parquet or JSONL files with prompts")  # noqa: RUF009
    val_files: list[str] = option(default_factory=list, help="held-out prompts")  # noqa: RUF009
    train_batch_size: int = option(
        16, ge=1, help="prompts per training step; each yields actor_rollout_ref.rollout.n samples"
    )
    max_prompt_length: int = option(
        512,
        ge=1,
        help="most prompt tokens (BOS and chat template included); longer prompts are "
        "filtered (filter_overlong_prompts) or cut/refused (truncation)",
    )
    filter_overlong_prompts: bool = option(
        True,
        help="drop prompts longer than max_prompt_length at start and count them; false: "
        "apply data.truncation to them",
    )
    truncation: Literal["error", "left", "right"] = option(
        "error",
        help="with filter_overlong_prompts=false, an overlong prompt is an error naming its "
        "row (error), or loses its first (left) or last (right) tokens",
    )
    max_response_length: int = option(1024, ge=1, help="most generated tokens per response")
    prompt_key: str = option("prompt", help="column holding the prompt text")
    answer_key: str = option("answer", help="column holding what the reward compares against")
    shuffle: bool = True
    seed: int = 0


@dataclass(kw_only=True)
class TrainerConfig(Config):
    """The trainer's loop: length, publishing cadence, resources, outputs."""

    total_training_steps: int = option(100, ge=1, help="optimizer steps in the run")
    trigger_parameter_sync_step: int = option(
        1, ge=1, help="optimizer steps between two published weight versions"
    )
    nnodes: int = option(
        1, ge=1, help="nodes of the trainer group (ranks: nnodes x n_gpus_per_node)"
    )
    n_gpus_per_node: int = option(
        0,
        ge=0,
        help="trainer ranks per node, one GPU each; without CUDA they are CPU ranks (gloo) "
        "and 0 means one CPU rank",
    )
    device: Literal["auto", "cpu", "cuda"] = option(
        "auto",
        help="where each trainer rank runs: cuda:<local rank> or the CPU; auto takes CUDA "
        "when there is some and says so when n_gpus_per_node counts CPU ranks",
    )
    project_name: str = option(
        "miniray_rl", help="the console prefix, wandb's project and mlflow's experiment"
    )
    experiment_name: str = option(
        "fully_async",
        help="the run's name: <default_local_dir>/<experiment_name>/checkpoints, the console "
        "prefix, the wandb and mlflow run name",
    )
    default_local_dir: str = option(
        "runs", help="runs/<experiment_name>/ gets logs and checkpoints"
    )
    save_freq: int = option(
        -1,
        ge=-1,
        help="checkpoint every N steps and after the last one; 0: only after the last; -1: never "
        "(checkpoints go to <default_local_dir>/<experiment_name>/checkpoints/global_step_<N>)",
    )
    resume_mode: Literal["auto", "disable", "resume_path"] = option(
        "auto",
        help="auto: resume from the newest checkpoint in the checkpoint directory if there is "
        "one; disable: start fresh; resume_path: resume from resume_from_path",
    )
    resume_from_path: str | None = option(
        None, help="resume_mode=resume_path: a global_step_<N> directory or a checkpoint directory"
    )
    max_actor_ckpt_to_keep: int | None = option(
        None, ge=1, help="keep only the newest N checkpoints; null keeps every one"
    )
    logger: list[str] = option(  # noqa: RUF009
        default_factory=lambda: ["console", "jsonl"],
        help="where per-step metrics go: console, jsonl, tensorboard, wandb (offline), mlflow "
        "($MLFLOW_TRACKING_URI, else a SQLite store in the run directory); wandb and mlflow are "
        "extras (pip install 'miniray[wandb]' / 'miniray[mlflow]')",
    )
    seed: int = option(
        0, help="seeds torch in the trainer and the engine's sampling (same seed, same tokens)"
    )
    test_freq: int = option(
        -1,
        ge=-1,
        help="evaluate on data.val_files every N steps and after the last step; -1: never "
        "during training (verl's default; 0 is refused: say -1)",
    )
    val_before_train: bool = option(
        True, help="evaluate on data.val_files before the first step (the summary's initial_reward)"
    )

    def validate(self) -> None:
        from miniray.rl.tracking import LOGGER_NAMES

        if self.test_freq == 0:
            raise ValueError(
                f"{self.key('test_freq')}=0 is invalid: evaluate every N >= 1 steps, or -1 for "
                "never during training"
            )

        for name in self.logger:
            if name not in LOGGER_NAMES:
                raise ValueError(
                    f"{self.key('logger')}={self.logger} is invalid: {name!r} is not a logger; "
                    f"the loggers are {list(LOGGER_NAMES)}"
                )
        if self.resume_mode == "resume_path" and not self.resume_from_path:
            raise ValueError(
                f"{self.key('resume_mode')}='resume_path' is invalid without "
                f"{self.key('resume_from_path')}: name the checkpoint to resume from"
            )


@dataclass(kw_only=True)
class RolloutConfig(Config):
    """Resources of the rollouter (its sampling parameters are actor_rollout_ref.rollout)."""

    nnodes: int = option(1, ge=1, help="nodes of rollout replicas")
    n_gpus_per_node: int = option(
        0,
        ge=0,
        help="generation processes per node, each with its own engine and GPU (RL: rollout "
        "replicas, nnodes x n_gpus_per_node / tensor_model_parallel_size, 0 or 1 being one in "
        "the rollouter's own process; distillation: rollout workers); on the CPU (no CUDA, or "
        "device=cpu) it counts CPU processes",
    )


@dataclass(kw_only=True)
class ReplicaRolloutConfig(RolloutConfig):
    """Rollout resources whose replicas restart: the RL rollouter's and distillation's workers."""

    max_restarts: int = option(
        1, ge=0, help="restarts of a rollout replica that died or hung, with the current weights"
    )
    device: Literal["auto", "cpu", "cuda"] = option(
        "auto",
        help="where each replica generates: a GPU of its own (the node's next after the "
        "trainer's) or the CPU; auto takes CUDA when there is some and n_gpus_per_node >= 1",
    )


@dataclass(kw_only=True)
class ModelConfig(Config):
    path: str = option(help="a Hugging Face causal LM in a local directory")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    enable_gradient_checkpointing: bool = False


@dataclass(kw_only=True)
class OptimConfig(Config):
    lr: float = option(1e-6, gt=0)
    weight_decay: float = option(0.0, ge=0)
    grad_clip: float = option(1.0, gt=0, help="max global gradient norm")


@dataclass(kw_only=True)
class ScheduledOptimConfig(OptimConfig):
    """The RL actor's optimizer, with verl's learning-rate schedule keys."""

    lr_warmup_steps_ratio: float = option(
        0.0, ge=0, le=1, help="linear warm-up over this fraction of total_training_steps"
    )
    warmup_style: Literal["constant", "cosine"] = option(
        "constant", help="after the warm-up: constant, or a cosine decay to min_lr_ratio * lr"
    )
    min_lr_ratio: float = option(0.0, ge=0, le=1, help="cosine: the last step's lr / lr")


CHECKPOINT_CONTENTS = ("model", "optimizer", "extra", "hf_model")


@dataclass(kw_only=True)
class ActorCheckpointConfig(Config):
    save_contents: list[str] = option(  # noqa: RUF009
        default_factory=lambda: ["model", "optimizer", "extra"],
        help="what a checkpoint holds: model, optimizer and extra (always: a resume needs all "
        "three), and hf_model: a save_pretrained export under global_step_<N>/huggingface",
    )

    def validate(self) -> None:
        unknown = [c for c in self.save_contents if c not in CHECKPOINT_CONTENTS]
        if unknown:
            raise ValueError(
                f"{self.key('save_contents')}={self.save_contents} is invalid: {unknown} "
                f"unknown; the contents are {list(CHECKPOINT_CONTENTS)}"
            )
        needed = [c for c in ("model", "optimizer", "extra") if c not in self.save_contents]
        if needed:
            raise ValueError(
                f"{self.key('save_contents')}={self.save_contents} is refused: it must include "
                f"{needed}, since a miniray checkpoint is always resumable (verl allows "
                "partial checkpoints; add hf_model for an export to load elsewhere)"
            )


@dataclass(kw_only=True)
class ActorConfig(Config):
    """The policy update: PPO clipping and the decoupled off-policy correction (AReaL)."""

    optim: ScheduledOptimConfig = field(default_factory=ScheduledOptimConfig)
    strategy: Literal["ddp", "fsdp2"] = option(
        "ddp",
        help="data parallelism of the trainer group: ddp (every rank holds the model) or "
        "fsdp2 (torch's fully_shard: weights, gradients and optimizer state sharded)",
    )
    ppo_epochs: int = option(1, ge=1)
    ppo_mini_batch_size: int | None = option(
        None, ge=1, help="samples per optimizer step; None: the whole batch"
    )
    ppo_micro_batch_size_per_gpu: int | None = option(
        None,
        ge=1,
        help="rows per forward/backward on each trainer rank, gradients accumulated over a "
        "minibatch: peak memory follows this, not the batch; None: a rank's whole share",
    )
    clip_ratio_low: float = option(0.2, ge=0, lt=1)
    clip_ratio_high: float = option(0.2, ge=0, help="larger than low gives DAPO's clip-higher")
    loss_agg_mode: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] = "token-mean"
    use_rollout_log_probs: bool = option(
        True, help="anchor the PPO ratio on the behaviour log-probs recorded at generation"
    )
    behaviour_weight_cap: float | None = option(
        5.0,
        gt=1,
        help="importance weights pi_prox/pi_behave above this are handled by "
        "behaviour_weight_mode; None: no cap",
    )
    behaviour_weight_mode: Literal["mask", "clamp"] = "mask"
    behaviour_weight_level: Literal["token", "prefix", "sequence"] = option(
        "token",
        help="token: each token's own ratio; prefix: the product over the response so far; "
        "sequence: the product over the whole response",
    )
    entropy_coeff: float = option(0.0, ge=0)
    use_kl_loss: bool = option(
        False,
        help="add kl_loss_coef * KL(policy || reference) to the loss; the reference is the "
        "model at actor_rollout_ref.model.path, frozen",
    )
    kl_loss_coef: float = option(0.001, ge=0, help="the KL term's weight (use_kl_loss)")
    kl_loss_type: Literal["low_var_kl", "k1", "k2", "k3"] = option(
        "low_var_kl",
        help="the per-token KL estimator (losses.kl_penalty); low_var_kl is k3, clamped",
    )
    checkpoint: ActorCheckpointConfig = field(default_factory=lambda: ActorCheckpointConfig())


@dataclass(kw_only=True)
class MultiTurnConfig(Config):
    """Conversations with tool calls (``rl.multi_turn``), verl's ``rollout.multi_turn`` keys."""

    enable: bool = option(
        False,
        help="a rollout is a conversation: the model's tool calls (Hermes <tool_call> format) "
        "run and their results come back in the chat template's tool role until it answers",
    )
    max_assistant_turns: int | None = option(
        None, ge=1, help="most model turns in a conversation; null: max_response_length decides"
    )
    max_parallel_calls: int = option(
        1, ge=1, help="most tool calls run from one turn (the first ones; verl's default 1)"
    )
    max_tool_response_length: int = option(
        256, ge=1, help="characters of a tool's answer the model sees (the rest is cut)"
    )
    tool_config_path: str | None = option(
        None, help="the YAML file of the tools (verl's layout: rl/tools.py); needed with enable"
    )
    format: Literal["hermes"] = option(
        "hermes", help="how calls are written: hermes, <tool_call>{json}</tool_call>"
    )


@dataclass(kw_only=True)
class RolloutSamplingConfig(Config):
    name: Literal["transformers", "vllm"] = option(
        "transformers", help="generation engine: transformers (CPU) or vllm (GPU, installed apart)"
    )
    n: int = option(4, ge=1, help="responses per prompt (the GRPO group size)")
    temperature: float = option(1.0, ge=0)
    top_p: float = option(
        1.0,
        gt=0,
        le=1,
        help="nucleus sampling: sample from the smallest set of tokens holding this much "
        "probability (renormalised; the behaviour log-probs are of that distribution); 1: off",
    )
    top_k: int = option(
        -1,
        ge=-1,
        help="sample from the k most likely tokens (renormalised, as top_p); -1 or 0: off",
    )
    calculate_log_probs: bool = True
    tensor_model_parallel_size: int = option(
        1, ge=1, help="GPUs one engine is split over; only 1 (one process, one device)"
    )
    multi_turn: MultiTurnConfig = field(default_factory=lambda: MultiTurnConfig())


@dataclass(kw_only=True)
class RefConfig(Config):
    """The frozen reference policy of actor.use_kl_loss."""

    log_prob_micro_batch_size_per_gpu: int | None = option(
        None,
        ge=1,
        help="samples per reference forward pass (per process on the CPU); null: the batch",
    )


@dataclass(kw_only=True)
class ActorRolloutRefConfig(Config):
    model: ModelConfig
    actor: ActorConfig = field(default_factory=ActorConfig)
    rollout: RolloutSamplingConfig = field(default_factory=RolloutSamplingConfig)
    ref: RefConfig = field(default_factory=RefConfig)
    nccl_timeout: float = option(
        600.0,
        gt=0,
        help="seconds any collective of the trainer group may wait (gloo too), and how long "
        "the driver waits for the other ranks once one has answered; past it the run fails "
        "naming the rank. Also how long a trainer rank or a rollout replica may take to start "
        "(its process and model)",
    )


@dataclass(kw_only=True)
class FilterGroupsConfig(Config):
    """Dynamic sampling (DAPO): train only on groups whose rewards differ."""

    enable: bool = option(
        False, help="drop groups whose metric is the same for every response; refill the batch"
    )
    metric: str = option(
        "score",
        help="what must differ: score (also seq_reward, seq_final_reward) or a numeric field "
        "of the reward function's dict (e.g. acc)",
    )
    max_num_gen_batches: int = option(
        0, ge=0, help="most batches fetched to fill one training batch; 0: no limit"
    )


@dataclass(kw_only=True)
class CustomRewardFunctionConfig(Config):
    """verl's custom_reward_function: compute_score(data_source, solution_str, ground_truth,
    extra_info) -> float | dict with 'score', in a Python file."""

    path: str | None = option(
        None, help="the Python file; null: the built-in exact-match reward (arithmetic rows)"
    )
    name: str = option("compute_score", help="the function's name in that file")
    timeout_s: float = option(
        60.0, gt=0, help="seconds one call may take; a longer call is an error naming it"
    )


@dataclass(kw_only=True)
class AlgorithmConfig(Config):
    adv_estimator: Literal["grpo"] = option(
        "grpo",
        help="the advantage: grpo (group-relative); verl's gae, rloo, reinforce_plus_plus ... "
        "are refused (no critic, no other estimator here)",
    )
    norm_adv_by_std_in_grpo: bool = option(
        True,
        help="divide group-centred rewards by the group's std; false: Dr. GRPO (reward minus "
        "the group mean)",
    )
    filter_groups: FilterGroupsConfig = field(default_factory=lambda: FilterGroupsConfig())


@dataclass(kw_only=True)
class RLConfig(Config):
    """The whole tree; ``data`` and ``actor_rollout_ref.model`` have required keys."""

    data: DataConfig
    actor_rollout_ref: ActorRolloutRefConfig
    async_training: AsyncTrainingConfig = field(default_factory=AsyncTrainingConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    rollout: ReplicaRolloutConfig = field(default_factory=ReplicaRolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    custom_reward_function: CustomRewardFunctionConfig = field(
        default_factory=CustomRewardFunctionConfig
    )

    def validate(self) -> None:
        check_refused(self, REFUSED)
        # The trainer takes train_batch_size items at once; a smaller queue could never hold
        # a whole batch and the trainer would wait forever.
        if self.async_training.max_queue_size < self.data.train_batch_size:
            raise ValueError(
                f"async_training.max_queue_size={self.async_training.max_queue_size} is "
                f"invalid: must be >= data.train_batch_size={self.data.train_batch_size}, "
                "or the trainer could never take a whole batch from the queue"
            )


# Keys accepted only at the values this version supports (``check_refused``).
REFUSED: dict[str, Refusal] = {
    "actor_rollout_ref.rollout.tensor_model_parallel_size": at_most(
        1, "tensor parallelism splits one engine over several GPUs; " + SCALE_OUT
    ),
    "actor_rollout_ref.rollout.calculate_log_probs": Refusal(
        bool,
        "must be true",
        "the rollouter always records the behaviour log-probs: the decoupled off-policy "
        "correction (actor.use_rollout_log_probs) and the importance weights need them",
    ),
}
