"""Spread reduction: the workers of a round reduce it themselves, through shared memory.

On the local backend, once the layout of the global weights is known, a sliced round never
sends a model through the object store and never funnels K models through one process:

    server                                     worker k (handle.__ray_call__, its own process)
    1 contribute(k) ---------------------->    get_weights() / get_gradients(), structure check,
                                                copy into input segment I_k      (K copies, parallel)
      <------------------ None | ValueError
    2 reduce_part(slice s) --------------->    participants (the server and the first P - 1 workers)
      server: slice 0 itself                    map I_0..I_K-1 and the result R, reduce slice s
      <------------------- NaN/Inf report       into R                           (K reads, 1 write)
      | NaN/Inf: exclude the worker, again; a participant that fails: the server redoes it all
      | strategy.apply / the server optimizer on the whole result
    3 load(R) ---------------------------->    map R copy-on-write, set_weights(views of it)
      <------------------------ kept views?                                      (K copies, parallel)

Every segment (I_k per worker id, R in a ring of two) is created by the server process under
the session's prefix, so the runtime removes it at shutdown or when the server dies; each
process maps each segment once and keeps the mapping, so after the first round no page is
faulted in again (a fresh 100 MB mapping costs ~2 memcpys of page faults, a new segment ~5).

A segment is written again only when nobody can still be reading or writing it: a
contribution that timed out may still write its input, a failed participant its slice of R,
a load that failed may still read R, a worker whose ``set_weights`` kept views of R
(``load`` reports it: the views' memoryviews are still alive), or the server's own views of R
still referenced (the previous global weights, a ``pull_weights`` result): such a segment is
*retired* (unlinked; the mappings that hold it keep its pages) and a fresh one takes its place.
The result is written into the ring segment that does not hold the current global weights,
so a stateful strategy's ``apply`` reads the old weights while the new ones are written.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from miniray.ps import gather, validation
from miniray.ps.sliced import (
    Layout,
    Mapped,
    SliceTask,
    plan_slices,
    reduce_slice,
    session_id,
    threads,
)
from miniray.ps.strategies import SyncStrategy
from miniray.runtime import shm

WeightList = list[torch.Tensor]


# -- the worker's side (runs inside the worker actors' processes) ------------------------------
_lock = threading.Lock()
_open: dict[str, Mapped] = {}  # this process's writable mappings of the server's segments


def _mapping(name: str, size: int, live: Sequence[str]) -> Mapped:
    """A cached shared mapping of segment ``name``; mappings of retired segments are dropped."""
    with _lock:
        for stale in [n for n in _open if n not in live]:
            _open.pop(stale).close()
        found = _open.get(name)
        if found is None or found.size < size:
            found = _open[name] = Mapped.open(name, size)
        return found


@dataclass(frozen=True)
class Contribution:
    """Worker k's part of step 1: call ``method`` and copy what it returns into ``segment``."""

    method: str
    worker_id: int
    segment: str
    layout: Layout
    live: tuple[str, ...]
    threads: int


def contribute(instance: Any, task: Contribution) -> ValueError | None:
    """Copy the worker's weights (or gradients) into its input segment.

    A structure that differs from the global weights is returned as the ``ValueError`` the
    gather path would raise (the server raises it: a programming error stops the round); an
    exception of the worker's own method propagates (the server leaves the worker out).
    """
    values = getattr(instance, task.method)()
    what = f"{task.method}()"
    try:
        validation.check_weight_list(values, task.worker_id, what)
        reference = [torch.empty(s, dtype=d, device="meta") for s, d in task.layout.entries()]
        validation.check_same_structure(
            reference, values, task.worker_id, reference_name="the global weights"
        )
    except ValueError as exc:
        return exc
    target = task.layout.views(_mapping(task.segment, task.layout.size, task.live).flat)
    with threads(task.threads), torch.no_grad():
        for dst, src in zip(target, values):
            dst.copy_(src)
    return None


@dataclass(frozen=True)
class ReducePart:
    """A participant's part of step 2: its slice of every included worker's input."""

    strategy_cls: type[SyncStrategy]
    strategy_kwargs: dict[str, Any]
    task: SliceTask  # pieces, result layout and segment, worker ids, NaN policy
    inputs: tuple[str, ...]  # the input segment of each of task.worker_ids
    input_layout: Layout
    live: tuple[str, ...]


def reduce_part(instance: Any, part: ReducePart) -> dict[int, int]:
    """Reduce ``part`` into the result segment; worker id -> first parameter with NaN/Inf."""
    del instance  # the worker's process is what takes part, not its object
    strategy = part.strategy_cls(**part.strategy_kwargs)
    if not hasattr(strategy, "worker_weights"):
        strategy.worker_weights = {}
    strategy.worker_weights.clear()  # in place: a reducer may share this dict
    strategy.worker_weights.update(part.task.worker_weights)
    size = part.input_layout.size
    lists = [part.input_layout.views(_mapping(n, size, part.live).flat) for n in part.inputs]
    assert part.task.segment is not None
    result = _mapping(part.task.segment, part.task.layout.size, part.live)
    return reduce_slice(strategy, part.task, lists, result.flat)


def load(instance: Any, segment: str, layout: Layout, method: str, live: Sequence[str]) -> bool:
    """``set_weights`` with views of the result segment; True if it kept any of them.

    The views map the segment copy-on-write, so a worker that writes into what it was given
    changes only its own pages, never the server's weights or another worker's load. The
    mapping is kept for the next round that uses this segment (the pages it has not written
    show the segment's current contents), unless the worker kept views or wrote into it.
    """
    mapping = _private_mapping(segment, layout.size, live)
    views, alive = layout.tracked_views(mapping)
    try:
        getattr(instance, method)(views)
    except BaseException:
        with _lock:  # the error's traceback may hold views: never hand this mapping out again
            _private.pop(segment, None)
        raise
    finally:
        del views
    kept = any(ref() is not None for ref in alive)
    if kept or shm.written(mapping, layout.size):
        with _lock:
            _private.pop(segment, None)
        if not kept:
            mapping.close()
    return kept


_private: dict[str, mmap.mmap] = {}  # copy-on-write mappings of result segments, for load


def _private_mapping(name: str, size: int, live: Sequence[str]) -> mmap.mmap:
    # A fresh 100 MB copy-on-write mapping costs ~27 ms of page faults before the 13 ms copy
    # (measured on the 2-core development machine): keeping it makes a load one copy.
    with _lock:
        for stale in [n for n in _private if n not in live]:
            try:
                _private.pop(stale).close()
            except BufferError:  # views of it are still alive: they keep it
                pass
        found = _private.get(name)
        if found is None or len(found) < size:
            found = _private[name] = shm.map_private(name, size)
        return found


# -- the server's side -------------------------------------------------------------------------
def _ray_call(handle: Any, fn: Any, *args: Any) -> Callable[[], Any]:
    """Starts ``fn(worker, *args)`` in the worker's process (every actor has ``__ray_call__``)."""
    return lambda: handle.__ray_call__.remote(fn, *args)


@dataclass(frozen=True)
class RunResult:
    """What one spread reduction produced."""

    reduced: WeightList  # views of the result segment
    nonfinite: dict[int, int]  # worker id -> first parameter index holding NaN/Inf
    failed: dict[int, str]  # slice index -> why its participant was dropped


class SpreadReduction:
    """The server's segments and the three steps of a spread round (see the module docstring)."""

    def __init__(
        self,
        strategy_cls: type[SyncStrategy],
        strategy_kwargs: dict[str, Any],
        num_processes: int | None,
        timeout_s: float,
    ):
        self.strategy_cls = strategy_cls
        self.strategy_kwargs = strategy_kwargs
        self.num_processes = num_processes
        self.timeout_s = timeout_s
        self.inputs: dict[int, Mapped] = {}
        self.results: list[Mapped] = []  # the ring; results[-1] holds the newest result
        # Weak references to the memoryviews under the server's views of each result segment:
        # while one is alive, somebody in this process still holds the weights it carries.
        self._handed_out: dict[str, list[weakref.ref]] = {}
        self._unsafe: set[str] = set()  # kept by a worker, or a load that may still run
        self._target: Mapped | None = None  # this round's result segment

    @staticmethod
    def available() -> bool:
        """Does this backend keep session segments (the local backend)?"""
        return session_id() is not None

    def live(self) -> tuple[str, ...]:
        return tuple(m.name for m in [*self.inputs.values(), *self.results])

    def num_slices(self, num_workers: int) -> int:
        if self.num_processes is not None:
            return max(1, min(self.num_processes, num_workers + 1))
        return max(1, min(num_workers, os.cpu_count() or 1))

    # step 1 ------------------------------------------------------------------------------
    def collect(
        self, handles: dict[int, Any], method: str, layout: Layout, deadline: float
    ) -> tuple[set[int], dict[int, str]]:
        """``(workers whose input segment holds their values, excluded)``; raises the first
        structural ``ValueError`` of a worker, as the gather path does."""
        sid = session_id()
        assert sid is not None
        self._target = None  # a new round
        for wid in handles:
            held = self.inputs.get(wid)
            if held is None or held.size != layout.size:
                self._retire_input(wid)
                self.inputs[wid] = Mapped.create(sid, layout.size)
        live = self.live()
        share = max(1, (os.cpu_count() or 1) // max(1, len(handles)))
        calls = {
            wid: _ray_call(
                handle,
                contribute,
                Contribution(method, wid, self.inputs[wid].name, layout, live, share),
            )
            for wid, handle in handles.items()
        }
        answers, _, excluded = gather.call_each(calls, deadline, f"{method} round")
        for wid, why in excluded.items():
            if why == "timeout":
                self._retire_input(wid)  # the late call may still write into it
        for wid in sorted(answers):
            if isinstance(answers[wid], ValueError):
                raise answers[wid]
        return set(answers), excluded

    # step 2 ------------------------------------------------------------------------------
    def reduce(
        self,
        strategy: SyncStrategy,
        handles: dict[int, Any],
        worker_ids: Sequence[int],
        input_layout: Layout,
        layout: Layout,
        *,
        upcast: Sequence[torch.dtype | None],
        check_inputs: bool,
    ) -> RunResult:
        """Reduce the inputs of ``worker_ids`` into a result segment: the server slice 0, the
        first P - 1 of those workers one slice each."""
        # Reruns of a round (after NaN/Inf) write into the same segment again.
        if self._target is None or self._target.size != layout.size:
            self._target = self._next_result(layout.size)
        result = self._target
        num = self.num_slices(len(worker_ids))
        slices = plan_slices(layout.numels(), layout.itemsizes(), num)
        base = SliceTask(
            pieces=(),
            layout=layout,
            worker_ids=tuple(worker_ids),
            upcast=tuple(upcast),
            check_inputs=check_inputs,
            worker_weights=dict(strategy.worker_weights),
            segment=result.name,
            threads=max(1, (os.cpu_count() or 1) // num),
        )
        tasks = [dataclasses.replace(base, pieces=tuple(pieces)) for pieces in slices]
        inputs = tuple(self.inputs[w].name for w in worker_ids)
        live = self.live()
        calls = {
            k: _ray_call(
                handles[worker_ids[k - 1]],
                reduce_part,
                ReducePart(
                    self.strategy_cls, self.strategy_kwargs, tasks[k], inputs, input_layout, live
                ),
            )
            for k in range(1, num)
            if tasks[k].pieces
        }
        # Started before the server reduces its own slice, so that all run at once.
        started = gather.start_each(calls, "a sliced reduction", "reducer of slice")
        lists = [input_layout.views(self.inputs[w].flat) for w in worker_ids]
        nonfinite = reduce_slice(strategy, tasks[0], lists, result.flat)
        answers, _, failed = gather.finish_each(
            started, time.monotonic() + self.timeout_s, "a sliced reduction", "reducer of slice"
        )
        if failed:
            # A participant that timed out may still write into the result segment: retire it
            # and reduce every slice here, into a fresh one.
            self.results.remove(result)
            self._retire(result)
            result = self._target = self._next_result(layout.size)
            whole = dataclasses.replace(
                base,
                pieces=tuple(p for pieces in slices for p in pieces),
                segment=result.name,
                threads=os.cpu_count() or 1,
            )
            nonfinite = reduce_slice(strategy, whole, lists, result.flat)
        else:
            for report in answers.values():
                for wid, p in report.items():
                    nonfinite[wid] = min(p, nonfinite.get(wid, p))
        assert result.mapping is not None
        views, alive = layout.tracked_views(result.mapping)
        self._handed_out[result.name] = alive
        return RunResult(views, nonfinite, failed)

    def _next_result(self, size: int) -> Mapped:
        """A ring segment nobody holds: not the current weights, not a kept or unsafe one."""
        sid = session_id()
        assert sid is not None
        for old in [s for s in self.results if s.size != size or s.name in self._unsafe]:
            self.results.remove(old)
            self._retire(old)
        for segment in self.results:
            if not self._still_held(segment):
                self.results.remove(segment)
                self.results.append(segment)
                return segment
        while len(self.results) >= 2:  # both held (the weights and, say, a pull's result)
            self._retire(self.results.pop(0))
        self.results.append(Mapped.create(sid, size))
        return self.results[-1]

    def _still_held(self, segment: Mapped) -> bool:
        return any(ref() is not None for ref in self._handed_out.get(segment.name, []))

    # step 3 ------------------------------------------------------------------------------
    def load(
        self, handles: dict[int, Any], layout: Layout, method: str, deadline: float
    ) -> dict[int, str]:
        """Every worker in ``handles`` loads this round's result; worker id -> why it failed."""
        result = self._target
        assert result is not None
        calls = {
            wid: _ray_call(handle, load, result.name, layout, method, self.live())
            for wid, handle in handles.items()
        }
        answers, _, failed = gather.call_each(calls, deadline, "the push of new weights")
        if failed or any(answers.values()):
            # A worker that kept views, or may still be reading: never rewrite this segment.
            self._unsafe.add(result.name)
        return failed

    # segments ----------------------------------------------------------------------------
    def _retire_input(self, wid: int) -> None:
        old = self.inputs.pop(wid, None)
        if old is not None:
            self._retire(old)

    def _retire(self, segment: Mapped) -> None:
        self._handed_out.pop(segment.name, None)
        self._unsafe.discard(segment.name)
        segment.close(unlink=True)

    def close(self) -> None:
        """Remove every segment (the workers' mappings of them go with their next task)."""
        for wid in list(self.inputs):
            self._retire_input(wid)
        for segment in self.results:
            self._retire(segment)
        self.results = []
