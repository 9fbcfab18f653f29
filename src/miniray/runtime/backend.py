"""The protocol every backend (inline, local, ray) implements behind the public API.

The public functions in ``api.py`` validate arguments and turn timeouts into deadlines; a
backend only does the work. The conformance suite (tests/runtime/test_conformance.py) runs the
same tests against every backend.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any, Protocol

from miniray.runtime.refs import ActorClass, ActorHandle, ObjectRef, RemoteFunction


class Backend(Protocol):
    name: str

    def submit_task(
        self, fn: RemoteFunction, args: tuple, kwargs: dict, options: dict[str, Any]
    ) -> Any: ...

    def create_actor(
        self, cls: ActorClass, args: tuple, kwargs: dict, options: dict[str, Any]
    ) -> ActorHandle: ...

    def submit_actor_call(
        self, handle: ActorHandle, method: str, args: tuple, kwargs: dict, options: dict[str, Any]
    ) -> Any: ...

    def get(self, refs: list[ObjectRef], deadline: float | None) -> list[Any]: ...

    def wait(
        self, refs: list[ObjectRef], num_returns: int, deadline: float | None
    ) -> tuple[list[ObjectRef], list[ObjectRef]]: ...

    def put(self, value: Any) -> ObjectRef: ...

    def future(self, ref: ObjectRef) -> Future: ...

    def kill(self, handle: ActorHandle, no_restart: bool) -> None: ...

    def get_actor(self, name: str, namespace: str | None) -> ActorHandle: ...

    def runtime_context(self) -> Any: ...

    def exit_actor(self) -> None: ...

    def cancel(self, ref: ObjectRef, force: bool, recursive: bool) -> None: ...

    def release(self, object_id: str) -> None: ...

    def pin(self, object_id: str) -> None: ...

    def shutdown(self) -> None: ...
