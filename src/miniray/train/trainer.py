"""BaseTrainer: the runtime's lifecycle, the worker actors, the epoch loop and its hooks.

    train(epochs, **kw)
      setup(**kw)        miniray.init() unless running; create_worker(i, **kw) for each i;
                         setup_workers(**kw); load the checkpoint named by resume_from()
      on_train_start(**kw)
      for epoch in range(epochs completed, epochs):
          on_epoch_start(epoch) -> train_epoch(epoch) -> on_epoch_end(epoch, result)
          -> metrics (JSONL, TensorBoard), progress bar, periodic checkpoint
      return on_train_end(history)

Every wait on workers goes through ``gather``: one deadline (``timeout_s``) per call, and the
first failure raises at once, naming the worker, the method and the epoch. ``epochs`` is the
epoch to stop at, as in Keras: a run resumed after k epochs runs epochs k..epochs-1.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import miniray
from miniray.errors import RayActorError, RayTaskError, WorkerCrashedError
from miniray.train import checkpoint
from miniray.train.errors import WorkerContractError, WorkerDiedError, WorkerTimeoutError
from miniray.train.metrics import MetricsWriter, jsonable
from miniray.train.progress import EpochProgress, wanted

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class TrainerConfig:
    """Options every trainer takes as keyword arguments (``BaseTrainer(num_workers, **options)``)."""

    num_workers: int = 4
    # Limit on every wait for workers (an epoch, an evaluation, a sync, a checkpoint).
    timeout_s: float = 1800.0
    progress: bool | None = None  # None: a bar when stderr is a terminal
    log_dir: str | None = None  # metrics.jsonl and TensorBoard events go here
    tensorboard: bool | None = None  # None: TensorBoard too when log_dir is set and it is installed
    checkpoint_dir: str | None = None  # periodic checkpoints go here (epoch_<k>, latest)
    checkpoint_interval: int = 1  # epochs between periodic checkpoints
    num_checkpoints_kept: int | None = 2  # None keeps every periodic checkpoint
    backend: str | None = None  # for miniray.init() when the trainer starts the runtime

    def __post_init__(self) -> None:
        for name in ("num_workers", "checkpoint_interval"):
            check_int(name, getattr(self, name), minimum=1)
        if self.num_checkpoints_kept is not None:
            check_int("num_checkpoints_kept", self.num_checkpoints_kept, minimum=1)
        t = self.timeout_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (0 < t < math.inf):
            raise ValueError(f"timeout_s={t!r} must be a finite number of seconds > 0")
        for name in ("progress", "tensorboard"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"{name}={value!r} must be True, False or None (automatic)")
        for name in ("log_dir", "checkpoint_dir", "backend"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise ValueError(f"{name}={value!r} must be a path string or None")


TRAINER_OPTIONS = frozenset(f.name for f in dataclasses.fields(TrainerConfig)) - {"num_workers"}


class BaseTrainer:
    """Owns the runtime, the workers and the epoch loop; subclasses say what a worker is.

    Override ``create_worker(worker_id, **kwargs)`` (required) and, for a custom loop,
    ``train_epoch(epoch, **kwargs)``. The default ``train_epoch`` calls every worker's
    ``train_epoch(epoch)`` in parallel and averages the numeric fields of their results.
    """

    # Methods every worker must have; checked when it is created, so a missing one is
    # reported before any training instead of as an AttributeError in the middle of a run.
    required_worker_methods: tuple[str, ...] = ()
    # Result fields that are counts: summed over workers instead of averaged.
    summed_result_fields: frozenset[str] = frozenset({"num_samples"})

    def __init__(self, num_workers: int = 4, **options: Any):
        unknown = sorted(set(options) - TRAINER_OPTIONS)
        if unknown:
            raise TypeError(
                f"{type(self).__name__}() got unknown options {unknown}; "
                f"known options are {sorted(TRAINER_OPTIONS)}"
            )
        self.config = TrainerConfig(num_workers=num_workers, **options)
        self.num_workers = num_workers
        self.workers: list[Any] = []
        self.param_server: Any = None
        self.epoch = 0  # epochs completed (a resumed run starts from the checkpoint's)
        self.history: list[dict[str, Any]] = []
        self._actors: list[Any] = []  # every actor this trainer started, to kill on shutdown
        self._owns_runtime = False
        self._closed = False
        self._ready = False  # setup() completed
        self._resume_path: str | None = None
        self._resumed = False
        self._metrics: MetricsWriter | None = None
        self._progress = EpochProgress(enabled=False, total=0, initial=0, num_workers=0)
        self._current_epoch: int | None = None  # the epoch being run, for error messages
        self._warned_weights_only = False

    # -- what subclasses implement -----------------------------------------------------------
    def create_worker(self, worker_id: int, **kwargs: Any) -> Any:
        """Return a new worker actor, e.g. ``return MyWorker.remote(worker_id, lr=self.lr)``."""
        raise NotImplementedError(
            f"{type(self).__name__}.create_worker(worker_id, **kwargs) must be overridden to "
            "return an actor handle, e.g. `return MyWorker.remote(worker_id)`"
        )

    def train_epoch(self, epoch: int, **kwargs: Any) -> dict[str, Any]:
        """One epoch on every worker; returns the epoch's result (numeric fields averaged)."""
        self.require_worker_method("train_epoch")
        return self.aggregate(self.call_workers("train_epoch", epoch))

    def setup_workers(self, **kwargs: Any) -> None:
        """Called once after the workers exist, before a checkpoint is loaded (no-op here)."""

    # -- hooks: no-op defaults; overrides should call super() (subclasses add behaviour) ----
    def on_train_start(self, **kwargs: Any) -> None:
        """Before the first epoch of a ``train`` call (after setup and any resume)."""

    def on_epoch_start(self, epoch: int, **kwargs: Any) -> None:
        """Before ``train_epoch(epoch)``."""

    def on_epoch_end(self, epoch: int, result: dict[str, Any], **kwargs: Any) -> None:
        """After ``train_epoch(epoch)``; ``self.epoch`` already counts this epoch."""

    def on_train_end(self, history: list[dict[str, Any]], **kwargs: Any) -> Any:
        """Its return value is ``train``'s: by default the history and the last result."""
        return {"history": history, "final": history[-1] if history else {}, "epochs": self.epoch}

    # -- the loop ------------------------------------------------------------------------------
    def train(self, epochs: int, **kwargs: Any) -> Any:
        """Train until ``epochs`` epochs are complete; ``kwargs`` reach ``create_worker``."""
        check_int("epochs", epochs, minimum=0)
        self.setup(**kwargs)
        self.on_train_start(**kwargs)
        self._progress = EpochProgress(
            enabled=wanted(self.config.progress) and self.epoch < epochs,
            total=epochs,
            initial=min(self.epoch, epochs),
            num_workers=self.num_workers,
        )
        try:
            for epoch in range(self.epoch, epochs):
                self._current_epoch = epoch
                self._progress.epoch_started(epoch)
                self.on_epoch_start(epoch, **kwargs)
                started = time.perf_counter()
                result = self._as_result(self.train_epoch(epoch, **kwargs), "train_epoch")
                result.setdefault("epoch_time_s", time.perf_counter() - started)
                self.epoch = epoch + 1
                self.history.append(result)
                self.on_epoch_end(epoch, result, **kwargs)
                self._after_epoch(result, epochs)
        finally:
            self._progress.close()
            self._current_epoch = None
        return self.on_train_end(list(self.history), **kwargs)

    def _after_epoch(self, result: dict[str, Any], epochs: int) -> None:
        """Record the epoch: metrics, progress bar, and a periodic checkpoint if one is due."""
        if self._metrics is not None:
            self._metrics.write(self.epoch, result, phase="train")
        self._progress.epoch_done(result)
        directory = self.config.checkpoint_dir
        if directory is not None and (
            self.epoch % self.config.checkpoint_interval == 0 or self.epoch == epochs
        ):
            path = self.save_checkpoint(checkpoint.periodic_path(directory, self.epoch))
            checkpoint.mark_latest(os.fspath(directory), path)
            checkpoint.prune(os.fspath(directory), self.config.num_checkpoints_kept)

    # -- lifecycle -----------------------------------------------------------------------------
    def setup(self, **kwargs: Any) -> None:
        """Start the runtime (unless running), create the workers, load a pending checkpoint.

        ``train`` calls it; call it yourself to use the workers before training (e.g. to
        ``evaluate`` an untrained model). Runs once: later calls return at once.
        """
        if self._closed:
            raise RuntimeError(f"this {type(self).__name__} was shut down; create a new one")
        if self._ready:
            return
        if self.workers:
            raise RuntimeError(
                f"an earlier setup() of this {type(self).__name__} failed half-way; shut it "
                "down and create a new one"
            )
        if not miniray.is_initialized():
            miniray.init(num_workers=self.num_workers, backend=self.config.backend)
            self._owns_runtime = True
        elif self.config.backend is not None and miniray.backend_name() != self.config.backend:
            raise ValueError(
                f"backend={self.config.backend!r} but miniray is already running the "
                f"{miniray.backend_name()!r} backend; shut it down first or drop the option"
            )
        workers = []
        for worker_id in range(self.num_workers):
            handle = self.create_worker(worker_id, **kwargs)
            if handle is not None and not isinstance(handle, miniray.ActorClass):
                self._actors.append(handle)
            self._check_worker(worker_id, handle)
            workers.append(handle)
        self.workers = workers
        self.setup_workers(**kwargs)
        if self._resume_path is not None:
            self._restore(self._resume_path)
        if self.config.log_dir is not None:
            self._metrics = MetricsWriter(
                os.fspath(self.config.log_dir),
                tensorboard=self.config.tensorboard,
                resume_epoch=self.epoch if self._resumed else None,
            )
        self._ready = True

    def shutdown(self) -> None:
        """Stop the workers (and the runtime, if this trainer started it). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._progress.close()
        if self._metrics is not None:
            self._metrics.close()
        if self._owns_runtime:
            miniray.shutdown()
        elif miniray.is_initialized():
            # Someone else's runtime: leave it running, but not our actors (processes).
            for actor in self._actors:
                try:
                    miniray.kill(actor)
                except RayActorError:
                    log.debug("actor %s was already dead at shutdown", actor)
        self._actors = []
        self.workers = []
        self.param_server = None

    def __enter__(self) -> BaseTrainer:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.shutdown()

    # -- calling workers -----------------------------------------------------------------------
    def call_workers(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """``method(*args, **kwargs)`` on every worker in parallel; results in worker order."""
        return self.call_each(method, [args] * len(self.workers), **kwargs)

    def call_each(
        self, method: str, args_per_worker: Sequence[tuple[Any, ...]], **kwargs: Any
    ) -> list[Any]:
        """``method(*args_per_worker[i], **kwargs)`` on worker i, in parallel."""
        if len(args_per_worker) != len(self.workers):
            raise ValueError(
                f"call_each({method!r}): {len(args_per_worker)} argument tuples for "
                f"{len(self.workers)} workers; give one per worker"
            )
        refs = []
        for worker_id, (worker, args) in enumerate(zip(self.workers, args_per_worker)):
            try:
                refs.append(getattr(worker, method).remote(*args, **kwargs))
            except RayActorError as exc:  # a backend may refuse calls to a known-dead actor
                raise self._died(worker_id, method, exc) from exc
        return self.gather(method, refs)

    def gather(self, method: str, refs: Sequence[Any]) -> list[Any]:
        """Values of ``refs`` (ref i = worker i) under one deadline; failures name the worker."""
        deadline = time.monotonic() + self.config.timeout_s
        worker_of = {ref: i for i, ref in enumerate(refs)}
        values: list[Any] = [None] * len(refs)
        pending = list(refs)
        while pending:
            remaining = max(0.0, deadline - time.monotonic())
            ready, pending = miniray.wait(pending, num_returns=1, timeout=remaining)
            if not ready:
                raise self._timed_out(method, sorted(worker_of[r] for r in pending))
            for ref in ready:
                values[worker_of[ref]] = self._value(ref, worker_of[ref], method)
            self._progress.workers_done(len(refs) - len(pending), len(refs))
        return values

    def _value(self, ref: Any, worker_id: int, method: str) -> Any:
        try:
            return miniray.get(ref, timeout=self.config.timeout_s)
        except (RayActorError, WorkerCrashedError) as exc:
            raise self._died(worker_id, method, exc) from exc
        except RayTaskError as exc:
            # The user's own exception: keep its type (``except ValueError`` must still work),
            # add where it happened.
            if hasattr(exc, "add_note"):
                exc.add_note(f"raised by worker {worker_id} in {method}(){self._where()}")
            raise

    def _where(self) -> str:
        epoch = self._current_epoch
        return "" if epoch is None else f" during epoch {epoch} (epochs count from 0)"

    def _died(self, worker_id: int, method: str, exc: BaseException) -> WorkerDiedError:
        # The runtime's whole message follows: for an actor whose __init__ raised it holds the
        # cause and the remote traceback on lines after the first.
        return WorkerDiedError(
            f"worker {worker_id} ({self._worker_class(worker_id)}) died while running "
            f"{method}(){self._where()}; resume from the last checkpoint with "
            f"resume_from(checkpoint_dir). The runtime said:\n{exc}",
            worker_id=worker_id,
            method=method,
            epoch=self._current_epoch,
        )

    def _worker_class(self, worker_id: int) -> str:
        # gather() may be given refs of a custom call that do not map onto self.workers.
        if 0 <= worker_id < len(self.workers):
            return _class_name(self.workers[worker_id])
        return "unknown class"

    def _timed_out(self, method: str, worker_ids: list[int]) -> WorkerTimeoutError:
        return WorkerTimeoutError(
            f"workers {worker_ids} did not finish {method}(){self._where()} within "
            f"timeout_s={self.config.timeout_s:g}; raise timeout_s if the work is that long, "
            "or look for a hang in the worker",
            worker_ids=worker_ids,
            method=method,
            epoch=self._current_epoch,
        )

    def _check_worker(self, worker_id: int, handle: Any) -> None:
        if isinstance(handle, miniray.ActorClass) or handle is None:
            raise WorkerContractError(
                f"{type(self).__name__}.create_worker({worker_id}) returned {handle!r}, not an "
                "actor; return an actor handle such as `MyWorker.remote(worker_id)`"
            )
        for method in self.required_worker_methods:
            self._check_method(worker_id, handle, method)

    def _check_method(self, worker_id: int, handle: Any, method: str) -> None:
        try:
            attr = getattr(handle, method)
        except AttributeError:
            raise WorkerContractError(
                f"worker {worker_id} ({_class_name(handle)}) has no method {method}(), which "
                f"{type(self).__name__} calls; add `def {method}(self, ...)` to the worker class "
                "(see docs/train.md, 'Worker contract')"
            ) from None
        if not callable(getattr(attr, "remote", None)):
            raise WorkerContractError(
                f"{type(self).__name__}.create_worker({worker_id}) returned a "
                f"{type(handle).__name__} instance, not an actor handle; decorate the class with "
                "@miniray.remote and return `MyWorker.remote(...)`"
            )

    def require_worker_method(self, method: str) -> None:
        """Raise ``WorkerContractError`` naming ``method`` if a worker lacks it."""
        for worker_id, handle in enumerate(self.workers):
            self._check_method(worker_id, handle, method)

    def has_worker_method(self, method: str) -> bool:
        """Whether every worker has ``method`` (for optional parts of the contract)."""
        return bool(self.workers) and all(_has_method(w, method) for w in self.workers)

    def _as_result(self, result: Any, method: str) -> dict[str, Any]:
        if result is None:
            return {}
        if not isinstance(result, Mapping):
            raise TypeError(
                f"{type(self).__name__}.{method}() returned a {type(result).__name__} "
                f"({result!r:.80}); it must return a dict of metrics"
            )
        return dict(result)

    # -- results -------------------------------------------------------------------------------
    def aggregate(self, results: Sequence[Any]) -> dict[str, Any]:
        """Combine per-worker results: numeric fields averaged, count fields summed."""
        return aggregate_results(results, summed=self.summed_result_fields)

    # -- evaluation ----------------------------------------------------------------------------
    def evaluate(self, **kwargs: Any) -> dict[str, Any]:
        """Every worker's ``evaluate(**kwargs)`` on its shard, weighted by ``num_samples``.

        Each worker returns ``{"num_samples": n, "accuracy": ..., ...}``; the result holds the
        sample-weighted mean of every numeric field and the total ``num_samples``. Workers use
        their current weights: right after ``train`` (which ends with a sync in
        ``DataParallelTrainer``) they all hold the same model.
        """
        if not self.workers:
            raise RuntimeError("evaluate() needs the workers: call train() or setup() first")
        self.require_worker_method("evaluate")
        results = self.call_workers("evaluate", **kwargs)
        combined = weighted_results(results)
        if self._metrics is not None:
            self._metrics.write(self.epoch, combined, phase="eval")
        return combined

    # -- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self, path: str | os.PathLike[str] | None = None) -> str:
        """Save workers (``state_dict()``, or weights), trainer state and epoch; return the path.

        Without ``path`` the checkpoint goes to ``<checkpoint_dir>/epoch_<k>``.
        """
        if path is None:
            if self.config.checkpoint_dir is None:
                raise ValueError(
                    "save_checkpoint() without a path needs the checkpoint_dir option; pass "
                    "a directory: save_checkpoint('ckpt/') or checkpoint_dir='ckpt/'"
                )
            path = checkpoint.periodic_path(os.fspath(self.config.checkpoint_dir), self.epoch)
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(
                f"save_checkpoint(path={path!r}): path must be a directory name (str or "
                "PathLike); to save every k epochs pass checkpoint_dir=..., checkpoint_interval=k"
            )
        if not self.workers:
            raise RuntimeError("save_checkpoint() needs the workers: call train() or setup()")
        kind = "state_dict" if self.has_worker_method("state_dict") else "weights"
        if kind == "weights":
            self.require_worker_method("get_weights")
            self._warn_weights_only()
        states = self.call_workers("state_dict" if kind == "state_dict" else "get_weights")
        state = {
            "epoch": self.epoch,
            "history": jsonable(self.history),
            "num_workers": self.num_workers,
            "trainer": type(self).__name__,
            "worker_state": kind,
        }
        return checkpoint.save(
            os.fspath(path), state=state, worker_states=states, write_extra=self.save_extra_state
        )

    def resume_from(self, path: str | os.PathLike[str]) -> int:
        """Continue from a checkpoint (or a ``checkpoint_dir``: its newest); returns its epoch.

        Before ``train`` the checkpoint is loaded once the workers exist; after, at once.
        """
        resolved = checkpoint.resolve(path)
        state = checkpoint.read_state(resolved)
        if state["num_workers"] != self.num_workers:
            raise ValueError(
                f"resume_from({os.fspath(path)!r}): the checkpoint has num_workers="
                f"{state['num_workers']}, this trainer num_workers={self.num_workers}; they "
                "must match (each worker's state and data shard belong to its worker_id)"
            )
        if self.workers:
            self._restore(resolved)
        else:
            self._resume_path = resolved
        return int(state["epoch"])

    def _restore(self, path: str) -> None:
        state, worker_states = checkpoint.load(path)
        if state["worker_state"] == "state_dict":
            self.require_worker_method("load_state_dict")
            self.call_each("load_state_dict", [(s,) for s in worker_states])
        else:
            self.require_worker_method("set_weights")
            self._warn_weights_only()
            self.call_each("set_weights", [(s,) for s in worker_states])
        self.load_extra_state(path, state)
        self.epoch = int(state["epoch"])
        self.history = list(state["history"])
        self._resumed = True
        self._resume_path = None
        log.info("resumed from %s after %d epochs", path, self.epoch)

    def save_extra_state(self, path: str) -> None:
        """Write what a subclass adds to a checkpoint into directory ``path`` (no-op here)."""

    def load_extra_state(self, path: str, state: dict[str, Any]) -> None:
        """Read back what ``save_extra_state`` wrote (no-op here)."""

    def _warn_weights_only(self) -> None:
        if not self._warned_weights_only:
            self._warned_weights_only = True
            log.warning(
                "worker class %s has no state_dict()/load_state_dict(): checkpoints hold its "
                "weights only, so optimizer state and random generators restart on resume",
                _class_name(self.workers[0]),
            )


# -- result arithmetic (pure functions) ------------------------------------------------------
def _number(value: Any) -> float | None:
    value = jsonable(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _check_results(results: Sequence[Any]) -> list[Mapping[str, Any]]:
    out = []
    for worker_id, result in enumerate(results):
        if result is None:
            result = {}
        if not isinstance(result, Mapping):
            raise TypeError(
                f"worker {worker_id} returned a {type(result).__name__} ({result!r:.80}); "
                "worker results must be dicts of metrics"
            )
        out.append(result)
    return out


def aggregate_results(
    results: Sequence[Any], *, summed: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """Numeric fields: mean over the workers that report them (sum for ``summed`` fields).

    Other fields: the value if every worker reports the same, else the list of values.
    """
    checked = _check_results(results)
    keys = list(dict.fromkeys(k for r in checked for k in r))
    out: dict[str, Any] = {}
    for key in keys:
        values = [r[key] for r in checked if key in r]
        numbers = [_number(v) for v in values]
        if all(n is not None for n in numbers):
            total = math.fsum(n for n in numbers if n is not None)
            out[key] = total if key in summed else total / len(numbers)
        elif all(_same(v, values[0]) for v in values):
            out[key] = values[0]
        else:
            out[key] = values
    return out


def weighted_results(results: Sequence[Any], *, weight_key: str = "num_samples") -> dict[str, Any]:
    """Numeric fields weighted by each worker's ``weight_key``; ``weight_key`` summed."""
    checked = _check_results(results)
    weights = []
    for worker_id, result in enumerate(checked):
        weight = _number(result.get(weight_key))
        if weight is None or weight < 0:
            raise ValueError(
                f"worker {worker_id}'s evaluate() returned {weight_key}="
                f"{result.get(weight_key)!r}; it must return the number of samples it evaluated "
                "(an int >= 0) so that metrics can be weighted by it"
            )
        weights.append(weight)
    total = math.fsum(weights)
    if total == 0:
        raise ValueError(f"no worker evaluated any sample ({weight_key} is 0 everywhere)")
    out: dict[str, Any] = {}
    keys = list(dict.fromkeys(k for r in checked for k in r if k != weight_key))
    for key in keys:
        pairs = [(_number(r.get(key)), w) for r, w in zip(checked, weights) if key in r]
        if all(n is not None for n, _ in pairs):
            mass = math.fsum(w for _, w in pairs)
            out[key] = math.fsum(n * w for n, w in pairs if n is not None) / mass if mass else 0.0
        else:
            out[key] = aggregate_results([{key: r[key]} for r in checked if key in r])[key]
    out[weight_key] = int(total) if float(total).is_integer() else total
    return out


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except (TypeError, ValueError, RuntimeError):  # tensors/arrays compare elementwise
        return a is b


def _has_method(handle: Any, method: str) -> bool:
    try:
        return callable(getattr(getattr(handle, method), "remote", None))
    except AttributeError:
        return False


def _class_name(handle: Any) -> str:
    return getattr(handle, "class_name", None) or type(handle).__name__


def check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")
