"""FullyAsyncTrainer: the policy being trained, its optimizer, and the weights it publishes.

It consumes groups of samples (oldest first, as the queue hands them out), takes one policy
update per batch (``policy.PolicyUpdater``: GRPO advantages, PPO loss with the decoupled
off-policy correction against the behaviour log-probs recorded at generation), and offers
``get_weights()`` to the parameter synchronizer. It can run in the driver or as an actor.
"""

from __future__ import annotations

import functools
import math
import pathlib
import random
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from miniray.rl.compat import actor_constructor
from miniray.rl.config import RLConfig
from miniray.rl.errors import NonFiniteWeightsError
from miniray.rl.extrapolation import Extrapolator
from miniray.rl.finite import copy_finite
from miniray.rl.parallel import (
    RankSetup,
    full_optimizer_state,
    full_state_dict,
    load_full_optimizer_state,
    load_full_state_dict,
    share_tied,
    tied_names,
    wrap,
)
from miniray.rl.policy import PolicyUpdateConfig, PolicyUpdater
from miniray.rl.rollouter import as_rl_config
from miniray.rl.staleness import check_version, sample_age
from miniray.rl.state_slots import StateSlots
from miniray.rl.tracking import peak_rss_gib
from miniray.rl.types import Sample
from miniray.runtime.serialization import Verified


def non_finite_parameters(weights: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point entries of ``weights`` holding NaN or inf, in order.

    One diverged step (a NaN loss, an overflowing update) poisons every later one, and the
    rollouter sampling from such weights crashes far from the cause (``torch.multinomial`` on
    NaN probabilities); the loop checks what it publishes with this. Tensors and NumPy arrays.
    """
    bad = []
    for name, value in weights.items():
        if isinstance(value, torch.Tensor):
            # One pass, no mask the size of the model: isfinite().all() took 4.0 s on a
            # bf16 Qwen2.5-0.5B on one thread, the sync's largest phase (_finite_range: ~0.04 s).
            if value.is_floating_point() and value.numel() and not _finite_range(value):
                bad.append(name)
        elif getattr(getattr(value, "dtype", None), "kind", "") in ("f", "c"):
            import numpy as np

            if not np.isfinite(value).all():
                bad.append(name)
    return bad


def check_finite_weights(
    weights: dict[str, Any], step: int, finite_at: int, metrics: dict[str, Any]
) -> None:
    """Raise ``NonFiniteWeightsError`` when ``weights`` (the trainer's after ``step``) hold NaN
    or inf, naming the step and the first such parameter. ``finite_at``: the last step whose
    weights were found finite, so the message bounds where the divergence began."""
    bad = non_finite_parameters(weights)
    if not bad:
        return
    since = (
        f"step {step}"
        if finite_at >= step - 1
        else f"steps {finite_at + 1}-{step} (finite after step {finite_at}, not checked between)"
    )
    shown = {k: metrics[k] for k in ("loss", "grad_norm", "lr") if k in metrics}
    raise NonFiniteWeightsError(
        f"step {step}: the trainer's weights are not finite: {bad[0]!r} holds NaN or inf "
        f"({len(bad)} of {len(weights)} entries do); the update diverged at {since} "
        f"(metrics of step {step}: {shown}). They were not published to the rollouter nor "
        "checkpointed. Lower actor_rollout_ref.actor.optim.lr (or look for a broken reward "
        "or data), then resume from the last checkpoint",
        step=step,
        parameter=bad[0],
    )


def enable_activation_checkpointing(model: Any) -> None:
    """``actor_rollout_ref.model.enable_gradient_checkpointing``: activations are recomputed
    in the backward pass instead of kept (less memory for long responses, ~30% more compute).
    Non-reentrant, torch's recommended variant. transformers 5.24 renamed the method to
    ``activation_checkpointing_enable`` and warns on the old name, which 4.x alone knows."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def is_activation_checkpointing(model: Any) -> bool:
    """Whether ``enable_activation_checkpointing`` is on (either transformers' name)."""
    return bool(
        getattr(model, "is_activation_checkpointing", None)
        if hasattr(model, "activation_checkpointing_enable")
        else model.is_gradient_checkpointing
    )


def _finite_range(value: torch.Tensor) -> bool:
    """Whether every entry of ``value`` is finite. A sum is finite only if every entry is (a
    NaN, or infinities of both signs, make it NaN; one sign, inf), and it reads memory faster
    than ``aminmax``: on one thread, bf16 at 24 against 16.6 GB/s (35 against 16 GB/s from
    the cache). A sum of finite entries can still overflow; then ``aminmax`` decides, as it
    does for float16, whose sums overflow at 65504."""
    value = value.detach()
    if value.dtype != torch.float16 and math.isfinite(float(value.sum())):
        return True
    low, high = torch.aminmax(value)
    return math.isfinite(float(low)) and math.isfinite(float(high))


def policy_update_config(config: RLConfig) -> PolicyUpdateConfig:
    """Every ``actor_rollout_ref.actor`` and ``algorithm`` option, as the update takes it."""
    actor, optim = config.actor_rollout_ref.actor, config.actor_rollout_ref.actor.optim
    total = config.trainer.total_training_steps
    return PolicyUpdateConfig(
        adv_estimator=config.algorithm.adv_estimator,
        norm_adv_by_std_in_grpo=config.algorithm.norm_adv_by_std_in_grpo,
        lr=optim.lr,
        weight_decay=optim.weight_decay,
        max_grad_norm=optim.grad_clip,
        warmup_steps=round(optim.lr_warmup_steps_ratio * total),
        warmup_style=optim.warmup_style,
        min_lr_ratio=optim.min_lr_ratio,
        total_steps=total,
        ppo_epochs=actor.ppo_epochs,
        ppo_mini_batch_size=actor.ppo_mini_batch_size,
        ppo_micro_batch_size=actor.ppo_micro_batch_size_per_gpu,
        clip_ratio_low=actor.clip_ratio_low,
        clip_ratio_high=actor.clip_ratio_high,
        loss_agg_mode=actor.loss_agg_mode,
        use_rollout_log_probs=actor.use_rollout_log_probs,
        behaviour_weight_cap=actor.behaviour_weight_cap,
        behaviour_weight_mode=actor.behaviour_weight_mode,
        behaviour_weight_level=actor.behaviour_weight_level,
        entropy_coeff=actor.entropy_coeff,
        temperature=config.actor_rollout_ref.rollout.temperature or 1.0,
        use_kl_loss=actor.use_kl_loss,
        kl_loss_coef=actor.kl_loss_coef,
        kl_loss_type=actor.kl_loss_type,
        ref_micro_batch_size=config.actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu,
    )


# From this many bytes of weights on, ``publishable_weights`` answers them ``Verified``:
# checked in the loop that copies them into shared memory (``rl.finite``), instead of read
# from memory once more beside (or before) the copy. At Qwen2.5-0.5B size (0.99 GB, bf16,
# 2 cores) the rank's answer took 113-119 ms with the check beside the copy, 86-117 ms with
# 1 MiB pieces checked from the cache after copying them, and 47-48 ms checked in a loop that
# stores past the cache (take_and_check, benchmarks/weight_sync.py); below a few MiB there is
# nothing to save (and no compiled loop to load), and the caller in this process gets plain
# weights, checked already.
CHECK_IN_COPY_MIN_BYTES = 16 << 20


def _state_bytes(weights: Mapping[str, torch.Tensor]) -> int:
    """The bytes of ``weights``, a tensor under several names (tied entries) once."""
    seen = {id(t): t for t in weights.values() if isinstance(t, torch.Tensor)}
    return sum(t.numel() * t.element_size() for t in seen.values())


class FullyAsyncTrainer:
    """The policy, its optimizer and what it publishes, in one process: the driver's (one
    rank, as the tests and benchmarks use it) or one rank of ``rl.trainer_group`` (``setup``
    says which, on which device, with which strategy; the group joined the process group)."""

    remote = actor_constructor(kind="remote", max_concurrency=2)
    options = actor_constructor(kind="options", max_concurrency=2)

    def __init__(self, config: Any, *, seed: int | None = None, setup: RankSetup | None = None):
        """``seed``: torch's seed for the update; None: ``trainer.seed``."""
        from miniray.rl.models.tiny import load, load_options, torch_dtype

        self.config = as_rl_config(config)
        self.setup = setup or RankSetup()
        model = self.config.actor_rollout_ref.model
        device = torch.device(self.setup.device)
        torch.manual_seed(self.config.trainer.seed if seed is None else seed)
        options = load_options(model, device=device.type)
        # The weights' dtype as published and generated with; FSDP2 keeps fp32 master shards
        # and computes in it, DDP and one rank train in it directly.
        self.dtype = torch_dtype(model.dtype)
        if self.setup.sharded:
            options = {**options, "dtype": "float32"}
        self.model, self.tokenizer = load(model.path, **options)
        self.model.to(device)
        if model.enable_gradient_checkpointing:
            enable_activation_checkpointing(self.model)
        self._tied = tied_names(self.model)
        # An unsharded model's weights are read where they live (~0.3 ms; state_dict() ~2 ms).
        self._state_slots = None if self.setup.sharded else StateSlots(self.model)
        self.wrapped = wrap(self.model, self.setup, compute_dtype=self.dtype)
        update = policy_update_config(self.config)
        # actor.use_kl_loss: the reference is the model the run starts from, loaded again and
        # frozen (a resumed run keeps the same reference: model.path, not the checkpoint).
        reference = None
        if update.use_kl_loss:
            reference = load(model.path, **load_options(model, device=device.type))[0].to(device)
        self.updater = PolicyUpdater(
            self.wrapped,
            pad_token_id=self.tokenizer.pad_token_id,
            config=update,
            ref_model=reference,
            device=device,
        )
        self.version = 0
        self.samples_trained = 0
        self.last_metrics: dict[str, Any] = {}  # the last step's, named by a NaN/inf error
        # publishable_weights(extrapolation=c): the weights as trained at the last publish.
        self._extrapolator = Extrapolator()

    @property
    def world_size(self) -> int:
        return self.setup.world_size

    @property
    def device(self) -> str:
        return self.setup.device

    def train_step(
        self, groups: Sequence[Sequence[Sample]], version: int | None = None
    ) -> dict[str, float]:
        """One optimizer step on a batch of groups; returns its metrics, ages included. In a
        group every rank gets the whole batch and trains on its share (``PolicyUpdater``).
        ``version``: the weights' version from this step on (``set_version`` in the same
        call: a step sent ahead of the publish that makes its version, ``TrainerGroup``)."""
        if version is not None:
            self.set_version(check_version(version, "version"))
        samples = [s for group in groups for s in group]
        if not samples:
            raise ValueError("train_step() needs at least one sample")
        ages = [sample_age(self.version, s.v_start) for s in samples]
        metrics = self.updater.step(
            samples,
            rank=self.setup.rank,
            world_size=self.setup.world_size,
            all_reduce=_sum_over_ranks if self.setup.world_size > 1 else None,
        )
        self.samples_trained += len(samples)
        metrics.update(
            age_mean=sum(ages) / len(ages),
            age_max=float(max(ages)),
            samples=float(len(samples)),
            trainer_peak_rss_gib=peak_rss_gib(),
        )
        self.last_metrics = metrics
        return metrics

    def get_weights(self) -> dict[str, torch.Tensor]:
        """A copy of the weights (safe to hand to anyone, in any process); tied entries once.
        FSDP2: gathered from the shards, every rank must call it, rank 0's is filled."""
        if self.setup.sharded:
            return self._full_weights()  # already a gathered copy
        return share_tied(self._full_weights(), copy=True)

    def publishable_weights(
        self,
        step: int,
        finite_at: int,
        metrics: dict[str, Any] | None = None,
        *,
        extrapolation: float = 0.0,
    ) -> dict[str, torch.Tensor] | Verified:
        """``live_weights`` after ``step``, checked here (``check_finite_weights``): in a rank
        the check reads its own resident tensors, where the driver reading the answer's fresh
        mapping took twice as long. ``metrics`` (named by the error): None for this trainer's
        last step's own. An answer that is stored is a checked one: NaN or inf makes the
        answer ``NonFiniteWeightsError``, so a call that takes the answer's ref as its
        argument (the rollouter's swap sent with the step) never gets unchecked weights.

        Weights of ``CHECK_IN_COPY_MIN_BYTES`` or more come back ``Verified``: the runtime
        checks them in the loop that copies them into shared memory (as the answer is
        stored). In this process, ``.full()`` checks them and ``.value`` is the weights.

        ``extrapolation`` c > 0: the weights extrapolated along the step since the last
        publish (``rl.extrapolation``), computed and checked here, so the driver passes the
        answer on as it is. Measured on the demo (2 cores, one sync per ~40 ms step, a
        timeline in every process): taking a copy to the driver, checking and extrapolating
        it there and putting the result took ~6 ms of the ~12 ms from a step's end to the
        rollouter generating with its weights, in the process that also routes every
        message."""
        weights = self.live_weights()
        if extrapolation:
            weights = self._extrapolator.publish(weights, extrapolation, keep_copy=True)
        if metrics is None:
            metrics = self.last_metrics
        check = functools.partial(check_finite_weights, weights, step, finite_at, metrics)
        if _state_bytes(weights) < CHECK_IN_COPY_MIN_BYTES:
            check()
            return weights
        return Verified(weights, copy_finite, check)

    def live_weights(self) -> dict[str, torch.Tensor]:
        """The parameters themselves, detached: for a caller that copies them out (a ``put``)
        before the next ``train_step``. The loop publishes through this, so the one copy of a
        sync is the one into shared memory, not a clone and then that copy."""
        return self._full_weights()

    def _full_weights(self) -> dict[str, torch.Tensor]:
        if self._state_slots is not None:  # the live tensors
            state = self._state_slots.read()
        else:
            state = full_state_dict(
                self.wrapped, self.model, self.setup, self._tied, dtype=self.dtype
            )
        if torch.device(self.setup.device).type != "cpu":
            state = share_tied({k: v.cpu() for k, v in state.items()}, copy=False)
        return state

    def set_version(self, version: int) -> int:
        self.version = int(version)
        return self.version

    def get_version(self) -> int:
        return self.version

    def greedy_tokens(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int
    ) -> list[list[int]]:
        """Greedy responses (token ids) of the policy to ``prompts``, for evaluation. FSDP2:
        every rank must call it (each forward gathers the layers' shards)."""
        from miniray.rl.engines import HFGenerationEngine

        engine = HFGenerationEngine(
            self.model,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        gens = engine.generate(
            [list(p) for p in prompts], max_new_tokens=max_new_tokens, temperature=0
        )
        return [list(g.response_token_ids) for g in gens]

    def save_checkpoint(self, path: str | pathlib.Path, extra: dict[str, Any]) -> pathlib.Path:
        """Write model, optimizer, version, counters, RNG states and the caller's ``extra``
        (JSON: the loop's step and data position) as one checkpoint directory at ``path``.

        Atomic (``rl.checkpoint.write``): a crash mid-write leaves the previous checkpoint
        and never a partial one under ``path``. In a group every rank calls it (FSDP2 gathers
        the full weights and optimizer state) and rank 0 writes; the RNG states are rank 0's.
        """
        from miniray.rl import checkpoint

        model = full_state_dict(self.wrapped, self.model, self.setup, self._tied)
        optimizer = full_optimizer_state(self.wrapped, self.updater.optimizer, self.setup)
        if self.setup.rank != 0:
            return pathlib.Path(path)
        tensors = {
            "model": model,
            "optimizer": optimizer,
            "rng_torch": torch.get_rng_state(),
            "rng_python": random.getstate(),
        }
        state = {
            "version": self.version,
            "updater_steps": self.updater.steps,
            "samples_trained": self.samples_trained,
            "world_size": self.setup.world_size,
            "strategy": self.setup.strategy,
            "extra": extra,
        }
        contents = self.config.actor_rollout_ref.actor.checkpoint.save_contents
        hf_model = (self.model, self.tokenizer) if "hf_model" in contents else None
        if hf_model is not None and self.setup.sharded:
            raise ValueError(
                "actor_rollout_ref.actor.checkpoint.save_contents has hf_model, which "
                "strategy=fsdp2 does not export (its model is sharded); use ddp or drop hf_model"
            )
        return checkpoint.write(path, state, tensors, hf_model=hf_model)

    def load_checkpoint(self, path: str | pathlib.Path) -> dict[str, Any]:
        """Restore everything ``save_checkpoint`` wrote; returns its ``extra``. In a group
        every rank reads the same checkpoint and keeps what it holds."""
        from miniray.rl import checkpoint

        state, tensors = checkpoint.read(path)
        self._extrapolator.reset()  # nothing to extrapolate the restored weights from
        load_full_state_dict(self.wrapped, self.model, self.setup, tensors["model"])
        load_full_optimizer_state(
            self.wrapped, self.updater.optimizer, self.setup, tensors["optimizer"]
        )
        torch.set_rng_state(tensors["rng_torch"])
        random.setstate(tensors["rng_python"])
        self.version = int(state["version"])
        self.updater.steps = int(state["updater_steps"])
        self.samples_trained = int(state["samples_trained"])
        return state["extra"]


def _sum_over_ranks(values: torch.Tensor) -> None:
    import torch.distributed as dist

    dist.all_reduce(values, op=dist.ReduceOp.SUM)
