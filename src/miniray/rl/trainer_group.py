"""TrainerGroup: the RL trainer as ``trainer.nnodes x n_gpus_per_node`` data-parallel rank
actors; the driver only coordinates them.

    driver: TrainerGroup                            rank r: TrainerRank (an actor, one call
                                                    at a time, so collectives pair up)
      start(cfg):  plan = group_plan(cfg)
                   rank 0.free_address() ---------> a free port on its host
                   every rank.join(addr) ---------> init_process_group (gloo / NCCL, with
                                                    actor_rollout_ref.nccl_timeout), load the
                                                    model, wrap it (ddp / fsdp2)
      train_step(groups) --- every rank --------->  its share of each minibatch, gradients
                                                    averaged in the backward pass
      get_weights / live_weights -- rank 0 (ddp), every rank (fsdp2 gathers the shards)
      save / load_checkpoint, greedy_tokens ---- every rank that must take part
      close() --- kill every rank

    A call waits for every rank it went to (``_all``): a rank that dies or fails ends it at
    once with ``TrainerRankError`` naming the rank; once one rank has answered, the others
    get ``nccl_timeout`` more (a rank stuck in a collective is ended by the group's own
    timeout by then).

Without CUDA, ``n_gpus_per_node`` counts CPU ranks (0: one), as ``rl.distill`` does for
rollout workers; ``trainer.device=auto`` says so once in the log and in the summary.
"""

from __future__ import annotations

import datetime
import gc
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import miniray
from miniray.errors import RayActorError
from miniray.rl.compat import actor_constructor
from miniray.rl.errors import NonFiniteWeightsError, TrainerRankError
from miniray.rl.parallel import RankSetup
from miniray.rl.placement import cuda_device_count, local_device, node_id, wants_cuda
from miniray.rl.trainer import FullyAsyncTrainer

__all__ = ["GroupPlan", "TrainerGroup", "TrainerRank", "group_plan"]

logger = logging.getLogger(__name__)

# How long a rank's failure waits for news of another rank's death before it is reported as
# the cause: on a loaded 2-core machine a SIGKILLed rank's exit reached the driver after its
# peer's gloo error in 2 of 3 runs of the killed-rank test (tests/rl/test_rl_trainer_group.py),
# which then named the survivor.
DEATH_GRACE_S = 3.0


@dataclass(frozen=True)
class GroupPlan:
    """What the config asks of the group on this machine (``group_plan``)."""

    world_size: int
    ranks_per_node: int
    device_type: str  # "cpu" | "cuda"
    backend: str  # "gloo" | "nccl"
    strategy: str  # "ddp" | "fsdp2"
    timeout_s: float
    note: str | None = None  # a CPU fallback the user should hear about
    # torch threads of a CPU rank (its num_cpus on Ray): the node's cores less the rollouter's
    # one engine thread, shared by the node's ranks. Each rank taking torch's default (every
    # core) oversubscribed a 2-core machine: the async demo ran no faster than sync (0.98x
    # against an ideal of 1.88), where the trainer in the driver with one thread got 1.6x.
    cpu_threads: int = 1

    def setup(self, rank: int) -> RankSetup:
        device = f"cuda:{rank % self.ranks_per_node}" if self.device_type == "cuda" else "cpu"
        return RankSetup(
            rank=rank, world_size=self.world_size, device=device, strategy=self.strategy
        )


def group_plan(cfg: Any, *, cuda_devices: int, cpu_count: int = 1) -> GroupPlan:
    """The group for ``cfg`` where ``cuda_devices`` CUDA devices are visible (pure).

    ``trainer.device``: ``cuda`` needs CUDA; ``auto`` takes it when there is some and
    otherwise runs ``n_gpus_per_node`` CPU ranks per node, with a note saying so. CPU ranks
    share ``cpu_count`` cores less one (the rollouter's engine thread).
    """
    trainer, actor = cfg.trainer, cfg.actor_rollout_ref.actor
    wanted, per_node = trainer.device, trainer.n_gpus_per_node
    if wanted == "cuda" and cuda_devices == 0:
        raise ValueError(
            "trainer.device='cuda' is invalid here: no CUDA device is visible "
            "(torch.cuda.is_available() is False); use auto or cpu"
        )
    use_cuda = wants_cuda(wanted, cuda_devices)
    note = None
    if use_cuda:
        if per_node < 1:
            raise ValueError(
                f"trainer.n_gpus_per_node={per_node} is invalid with CUDA: must be >= 1"
            )
        if trainer.nnodes == 1 and per_node > cuda_devices:
            raise ValueError(
                f"trainer.n_gpus_per_node={per_node} is invalid: only {cuda_devices} CUDA "
                "device(s) are visible on this node"
            )
    elif wanted == "auto" and per_node > 0:
        note = (
            f"no CUDA device: trainer.n_gpus_per_node={per_node} counts CPU ranks "
            f"({trainer.nnodes * per_node} in all)"
        )
    ranks_per_node = max(1, per_node)
    return GroupPlan(
        world_size=trainer.nnodes * ranks_per_node,
        ranks_per_node=ranks_per_node,
        device_type="cuda" if use_cuda else "cpu",
        backend="nccl" if use_cuda else "gloo",
        strategy=actor.strategy,
        timeout_s=float(cfg.actor_rollout_ref.nccl_timeout),
        note=note,
        cpu_threads=1 if use_cuda else max(1, (cpu_count - 1) // ranks_per_node),
    )


class TrainerRank(FullyAsyncTrainer):
    """One rank: a ``FullyAsyncTrainer`` whose model is built once the group is joined."""

    remote = actor_constructor(kind="remote", max_concurrency=1)
    options = actor_constructor(kind="options", max_concurrency=1)

    def __init__(self, config: Any, setup: RankSetup):
        # Nothing heavy yet: the group first needs rank 0's address to join at.
        self._pending_config = config
        self.setup = setup

    def free_address(self) -> tuple[str, int]:
        """This host's address as the other ranks reach it, and a port free on it."""
        host = "127.0.0.1"
        try:
            import ray

            if ray.is_initialized():  # a Ray cluster: the ranks may be on other nodes
                host = ray.util.get_node_ip_address()
        except ImportError:
            pass
        with socket.socket() as probe:
            probe.bind((host, 0))
            return host, int(probe.getsockname()[1])

    def join(
        self,
        host: str,
        port: int,
        *,
        backend: str,
        timeout_s: float,
        cpu_threads: int | None = None,
    ) -> dict[str, Any]:
        """Join the process group at rank 0's ``host:port`` (collectives then wait at most
        ``timeout_s``), then load and wrap the model; returns this rank's pid, device, node."""
        import torch

        if cpu_threads is not None:
            torch.set_num_threads(cpu_threads)
        # cuda:<local rank> as this process numbers its GPUs: a Ray rank (num_gpus=1) sees only
        # its own, as cuda:0.
        self.setup = replace(self.setup, device=local_device(self.setup.device))
        if self.setup.device.startswith("cuda"):
            torch.cuda.set_device(torch.device(self.setup.device))
        if self.setup.wrapped:
            import torch.distributed as dist

            dist.init_process_group(
                backend,
                init_method=f"tcp://{host}:{port}",
                rank=self.setup.rank,
                world_size=self.setup.world_size,
                timeout=datetime.timedelta(seconds=timeout_s),
            )
        FullyAsyncTrainer.__init__(self, self._pending_config, setup=self.setup)
        gc.freeze()  # the model and optimizer live as long as the rank (runtime/local/worker.py)
        return {"pid": os.getpid(), "device": self.setup.device, "node": node_id()}


class TrainerGroup:
    """The driver's handle on the ranks; offers what the loop asks of a trainer
    (``train_step``, ``get_weights``, ``set_version``, checkpoints, ``greedy_tokens``)."""

    def __init__(self, plan: GroupPlan, ranks: list[Any], pids: list[int], tokenizer: Any):
        self.plan = plan
        self.ranks = ranks
        self.pids = pids
        self.nodes: list[str] = []  # each rank's node id (the Ray cluster test checks them)
        self.tokenizer = tokenizer
        self.version = 0
        # Calls sent and not waited for (``set_version``), collected before the next call.
        self._deferred: list[_Sent] = []
        # Steps sent and not answered yet, oldest first (at most two: ``send_step``).
        self._steps: deque[_Sent] = deque()
        self._sent_version: int | None = None  # the version the ranks have been sent last
        # The weights call to send right behind the next train_step (``prepare_publish``),
        # then those calls, sent, until ``get_weights``/``published_weights`` takes their
        # answers (oldest first: with a step sent ahead, the previous step's is still there).
        self._after_step: _Call | None = None
        self._prefetched: list[tuple[_Call, list[_Sent]]] = []

    @classmethod
    def start(cls, config: Any) -> TrainerGroup:
        """Start the ranks ``config`` asks for and wait (``nccl_timeout``) until every one
        has joined and loaded the model."""

        from miniray.rl.models.tiny import load_tokenizer
        from miniray.rl.rollouter import as_rl_config

        cfg = as_rl_config(config)
        plan = group_plan(cfg, cuda_devices=cuda_device_count(), cpu_count=os.cpu_count() or 1)
        if plan.note:
            logger.warning("%s", plan.note)
        if plan.world_size > 1 and miniray.backend_name() == "inline":
            raise ValueError(
                f"the trainer group has {plan.world_size} ranks (trainer.nnodes x "
                "n_gpus_per_node), which need a process each: the inline backend runs actors "
                "as threads of one process; use the local or ray backend"
            )
        gpus = 1 if plan.device_type == "cuda" else 0
        ranks = [
            TrainerRank.options(num_cpus=plan.cpu_threads, num_gpus=gpus).remote(cfg, plan.setup(r))
            for r in range(plan.world_size)
        ]
        group = cls(plan, ranks, [0] * len(ranks), None)
        try:
            (address,) = group._all("free_address", ranks=ranks[:1])
            joined = group._all(
                "join",
                *address,
                backend=plan.backend,
                timeout_s=plan.timeout_s,
                cpu_threads=plan.cpu_threads if plan.device_type == "cpu" else None,
            )
        except BaseException:
            group.close()
            raise
        group.pids = [j["pid"] for j in joined]
        group.nodes = [j["node"] for j in joined]
        model = cfg.actor_rollout_ref.model
        group.tokenizer = load_tokenizer(model.path, trust_remote_code=model.trust_remote_code)
        return group

    @property
    def world_size(self) -> int:
        return self.plan.world_size

    @property
    def device(self) -> str:
        return self.plan.setup(0).device

    @property
    def placement_note(self) -> str | None:
        return self.plan.note

    def train_step(self, groups: Sequence[Sequence[Any]]) -> dict[str, float]:
        """One step on every rank; the metrics (reduced over the ranks) of rank 0. A weights
        call asked for by ``prepare_publish`` is sent right behind it."""
        self.send_step(groups)
        return self.step_result()

    def send_step(self, groups: Any, version: int | None = None) -> None:
        """Send a step without waiting for it (``step_result`` answers it). ``groups``: the
        batch, or the ref of a batch still being made (the queue's ``get_batch``): each rank
        starts the step once it is there. ``version``: the ranks' version from this step on.

        One step may be sent ahead of the one running: a rank runs its calls in order, so it
        goes from one step (and its publish's weights call) straight to the next instead of
        waiting a round trip through the driver for it (the loop, ``rl/loop.py``). Measured on
        the demo (2 cores): the rank waited 12.6 ms (p50) between two ~40 ms steps."""
        if len(self._steps) >= 2:
            raise RuntimeError("send_step(): two steps are in flight already; take a result")
        # A prepared publish nobody took is dropped; the previous step's, when this one is
        # sent ahead of its publish, is still to be taken.
        self._prefetched = self._prefetched[-1:] if self._steps else []
        if not isinstance(groups, miniray.ObjectRef):
            groups = list(groups)
        if version is not None:
            self.version = self._sent_version = version = int(version)
        self._steps.append(self._send("train_step", groups, version=version))
        after, self._after_step = self._after_step, None
        if after is not None:
            self._prefetched.append((after, self._send_weights_call(after)))

    def step_result(self) -> dict[str, float]:
        """The metrics of the oldest step sent (``train_step``'s answer)."""
        if not self._steps:
            raise RuntimeError("step_result(): no step was sent")
        sent = self._steps[0]
        try:
            return self._answers(sent)[0][1]
        finally:
            self._steps.popleft()

    def prepare_publish(
        self,
        step: int,
        finite_at: int,
        *,
        extrapolation: float = 0.0,
    ) -> None:
        """The next ``train_step`` (``step``) is followed by a publish: its weights call goes
        to the ranks right behind the step, so a rank starts it the moment the step ends,
        rather than one round trip later when the driver has the step's answer (the demo's
        get_weights went from 1.7 to 1.4 ms per ~40 ms step, benchmarks/async_vs_sync.py).
        The call is ``published_weights(step, finite_at, ..., extrapolation=...)``'s, checked
        (and extrapolated) by the rank against its own step's metrics;
        ``prepared_publish_ref`` gives its answer's ref once the step is sent."""
        self._after_step = _Call(
            "publishable_weights",
            self._weight_ranks(),
            _Publish(step, finite_at, float(extrapolation)),
        )

    def prepared_publish_ref(self, step: int) -> miniray.ObjectRef | None:
        """The ref the weights after ``step`` will be stored under: the answer of the weights
        call sent behind that step (``prepare_publish``), or None if there is none. A caller
        may hand it on before it is there (a call taking it as an argument runs once it is,
        and only with checked weights: unchecked ones are never stored)."""
        for call, sent in self._prefetched:
            if call.publish is not None and call.publish.step == step:
                return next(iter(sent[0].refs))  # the first weight rank's: rank 0's
        return None

    def get_weights(self) -> dict[str, Any]:
        call = _Call("get_weights", self._weight_ranks())
        sent = self._take_prefetched(call) or self._send_weights_call(call)
        return self._answers(sent[0])[0][1]

    def live_weights(self) -> dict[str, Any]:
        return self._all("live_weights", ranks=self._weight_ranks())[0]

    def published_weights(
        self,
        step: int,
        finite_at: int,
        metrics: dict[str, Any],
        *,
        extrapolation: float = 0.0,
    ) -> miniray.ObjectRef:
        """The weights after ``step`` to publish, left in the object store: the ref of the
        weight rank's ``publishable_weights`` answer (checked there; NaN or inf raises
        ``NonFiniteWeightsError`` as it is). The rank's serialization of its answer is the
        sync's one copy; passing the ref on instead of putting the driver's value again saves
        a second copy of the model (benchmarks/weight_sync.py: the publish went from 0.76 s
        to 0.40 s at Qwen2.5-0.5B size, docs/benchmarks.md). ``extrapolation`` c > 0: the
        rank publishes its weights extrapolated along the step since its last publish
        (``rl.extrapolation``). Large weights are checked as the rank's answer is copied out
        (``trainer.CHECK_IN_COPY_MIN_BYTES``)."""
        call = _Call(
            "publishable_weights",
            self._weight_ranks(),
            _Publish(step, finite_at, float(extrapolation)),
        )
        (weights,) = self._take_prefetched(call) or self._send_weights_call(call, metrics)
        return self._answers(weights)[0][0]

    def set_version(self, version: int) -> int:
        """Tell the ranks the version their weights now are, without waiting: a rank runs
        its calls in order, so the next call (a ``train_step``) finds this one done, and its
        answer (an error, a dead rank) is collected before that call is sent. Waiting here was
        a round trip, 1.3 ms of each ~40 ms step of the demo (benchmarks/async_vs_sync.py)."""
        self.version = int(version)
        if self.version == self._sent_version:  # sent with the last step (``send_step``)
            return self.version
        sent = self._send("set_version", self.version, within=self.plan.timeout_s)
        self._deferred.append(sent)  # after _send, which empties the list of earlier ones
        self._sent_version = self.version
        return self.version

    def save_checkpoint(self, path: Any, extra: dict[str, Any]) -> Any:
        return self._all("save_checkpoint", path, extra)[0]

    def load_checkpoint(self, path: Any) -> dict[str, Any]:
        extras = self._all("load_checkpoint", path)
        self.version = int(self._all("get_version", ranks=self.ranks[:1])[0])
        return extras[0]

    def greedy_tokens(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list:
        ranks = self.ranks if self.plan.strategy == "fsdp2" else self.ranks[:1]
        return self._all("greedy_tokens", [list(p) for p in prompts], max_new_tokens, ranks=ranks)[
            0
        ]

    def close(self) -> None:
        """Kill every rank (their process groups go with them); idempotent."""
        ranks, self.ranks = self.ranks, []
        for rank in ranks:
            try:
                miniray.kill(rank)
            except Exception as exc:  # already gone, or the runtime is shutting down
                logger.debug("killing a trainer rank: %s", exc)

    def _weight_ranks(self) -> list[Any]:
        # FSDP2 gathers the shards (every rank takes part); otherwise rank 0 has them all.
        return self.ranks if self.plan.strategy == "fsdp2" else self.ranks[:1]

    def _all(self, method: str, *args: Any, ranks: list[Any] | None = None, **kwargs: Any) -> list:
        """``method(*args, **kwargs)`` on ``ranks`` (default: all), their answers in rank
        order. The first rank to die or fail raises ``TrainerRankError`` naming it; after
        the first answer the rest get ``timeout_s`` more."""
        return [answer for _, answer in self._all_refs(method, *args, ranks=ranks, **kwargs)]

    def _all_refs(
        self, method: str, *args: Any, ranks: list[Any] | None = None, **kwargs: Any
    ) -> list[tuple[miniray.ObjectRef, Any]]:
        """``_all``, each answer with the ref it is stored under. Any such call drops a
        prepared publish not taken yet: the call may change the weights it would answer.
        Never with a step in flight: the call would run after it, on weights it changed."""
        if self._steps:
            raise RuntimeError(
                f"{method}() while {len(self._steps)} step(s) are in flight: take their "
                "results first (step_result)"
            )
        self._prefetched, self._after_step = [], None
        return self._answers(self._send(method, *args, ranks=ranks, **kwargs))

    def _send_weights_call(self, call: _Call, metrics: dict[str, Any] | None = None) -> list[_Sent]:
        """Send ``call`` (``get_weights``, or ``publishable_weights``, whose answer is its
        verdict: checked weights or ``NonFiniteWeightsError``). ``metrics`` None: each rank
        names its own step's."""
        within = self.plan.timeout_s
        if call.publish is None:
            return [self._send(call.method, ranks=call.ranks, within=within)]
        return [
            self._send(
                call.method,
                call.publish.step,
                call.publish.finite_at,
                None if metrics is None else dict(metrics),
                extrapolation=call.publish.extrapolation,
                ranks=call.ranks,
                within=within,
            )
        ]

    def _take_prefetched(self, call: _Call) -> list[_Sent] | None:
        """The oldest sent call ``prepare_publish`` made, taken: its answers if it is
        ``call``, else None (that call's answers are dropped)."""
        if not self._prefetched:
            return None
        prepared, sent = self._prefetched.pop(0)
        return sent if prepared == call else None

    def _send(
        self,
        method: str,
        *args: Any,
        ranks: list[Any] | None = None,
        within: float | None = None,
        **kwargs: Any,
    ) -> _Sent:
        """Send ``method`` to ``ranks``, once the calls sent and not waited for (``set_version``)
        have answered; ``within``: seconds the first answer may take once it is waited for
        (None: a ``train_step``, as long as the step takes)."""
        deferred, self._deferred = self._deferred, []
        for earlier in deferred:
            self._answers(earlier)
        ranks = self.ranks if ranks is None else ranks
        if not ranks:
            raise TrainerRankError(-1, None, f"the trainer group is closed; cannot call {method}")
        refs = {getattr(r, method).remote(*args, **kwargs): i for i, r in enumerate(ranks)}
        return _Sent(method, refs, within)

    def _answers(self, sent: _Sent) -> list[tuple[miniray.ObjectRef, Any]]:
        """The answers of ``sent`` in rank order. The first rank to die or fail raises
        ``TrainerRankError`` naming it; after the first answer the rest get ``timeout_s``
        more."""
        method, pending = sent.method, dict(sent.refs)
        answers: dict[int, tuple[miniray.ObjectRef, Any]] = {}
        deadline = None if sent.within is None else time.monotonic() + sent.within
        while pending:
            wait_s = 5.0 if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _ = miniray.wait(list(pending), num_returns=1, timeout=wait_s)
            if not ready and deadline is not None and time.monotonic() >= deadline:
                late = sorted(pending.values())
                after = f"of rank {min(answers)}" if answers else "(no rank answered)"
                raise TrainerRankError(
                    late[0],
                    self._pid(late[0]),
                    f"trainer rank(s) {late} did not finish {method} within "
                    f"{self.plan.timeout_s:g}s {after}: a rank stuck in a collective or far "
                    "slower than the others; raise actor_rollout_ref.nccl_timeout if its work "
                    "is just slow",
                )
            for ref in ready:
                rank = pending.pop(ref)
                try:
                    answers[rank] = (ref, miniray.get(ref, timeout=self.plan.timeout_s))
                except RayActorError as exc:
                    raise self._died(rank, method, exc) from exc
                except Exception as exc:
                    cause = getattr(exc, "cause", exc)
                    if isinstance(cause, NonFiniteWeightsError):
                        raise cause from None  # the update diverged: not the rank's failure
                    # A rank's collective fails when a peer dies, and its error may arrive
                    # first: name the dead rank, the cause, if one turns out to be dead.
                    self._raise_if_one_died(pending, method)
                    raise TrainerRankError(
                        rank,
                        self._pid(rank),
                        f"trainer rank {rank} (pid {self._pid(rank)}) failed in {method}: "
                        f"{type(exc).__name__}: {exc}",
                    ) from exc
            if answers and deadline is None:
                deadline = time.monotonic() + self.plan.timeout_s
        return [answers[i] for i in range(len(sent.refs))]

    def _died(self, rank: int, method: str, exc: BaseException) -> TrainerRankError:
        return TrainerRankError(
            rank,
            self._pid(rank),
            f"trainer rank {rank} (pid {self._pid(rank)}) died during {method}: {exc}; the "
            "group is closed: look for an OOM kill or a crash in that rank's output, then "
            "resume from the last checkpoint",
        )

    def _raise_if_one_died(self, pending: dict[Any, int], method: str) -> None:
        """Raise the death of a rank among ``pending`` noticed within a short grace (its
        process's exit reaches the driver a moment after the survivors' broken collectives)."""
        deadline = time.monotonic() + min(DEATH_GRACE_S, self.plan.timeout_s)
        waiting = dict(pending)
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            ready, _ = miniray.wait(list(waiting), num_returns=1, timeout=left)
            for ref in ready:
                rank = waiting.pop(ref)
                try:
                    miniray.get(ref, timeout=0)
                except RayActorError as exc:
                    raise self._died(rank, method, exc) from exc
                except Exception:  # another survivor's error: keep looking for the dead one
                    pass

    def _pid(self, rank: int) -> int | None:
        return self.pids[rank] if rank < len(self.pids) and self.pids[rank] else None


@dataclass(frozen=True)
class _Sent:
    """A call sent to some ranks: its method and each answer's ref -> the rank's index."""

    method: str
    refs: dict[Any, int]
    within: float | None = None  # the first answer's bound (None: unbounded, as a step)


@dataclass(frozen=True)
class _Publish:
    """What a ``publishable_weights`` call publishes: the weights after ``step``, checked
    against ``finite_at`` (the last step found finite), extrapolated by ``extrapolation``."""

    step: int
    finite_at: int
    extrapolation: float


@dataclass(frozen=True)
class _Call:
    """A call to make on some ranks (compared by method, ranks and what it publishes):
    ``get_weights`` (``publish`` None) or ``publishable_weights``."""

    method: str
    ranks: list[Any]
    publish: _Publish | None = None
