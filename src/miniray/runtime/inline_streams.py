"""The inline backend's streaming generators (``num_returns="streaming"``, tasks and actor
methods): each value the generator yields is stored and its ref handed to the stream at once;
the generator's error, if any, is the stream's last value.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Any

from miniray.errors import RaySystemError, TaskCancelledError
from miniray.runtime import streaming
from miniray.runtime.inline_objects import InlineObjects

if TYPE_CHECKING:
    from miniray.runtime.inline_actors import _Call


class InlineStreams(InlineObjects):
    _closed: bool
    _streams: weakref.WeakSet[streaming.Stream]

    def _new_stream(self) -> streaming.Stream:
        stream = streaming.Stream(threading.Condition(), self._check_open, self.release)
        self._streams.add(stream)
        return stream

    def _check_open(self) -> None:
        if self._closed:
            raise RaySystemError("the runtime was shut down before the generator task ended")

    def _stream_values(
        self,
        stream: streaming.Stream,
        name: str,
        values: Any,
        streamed: list[int],
        call: _Call | None = None,
    ) -> None:
        """Store each value the generator yields and hand its ref to the stream at once."""
        if not hasattr(values, "__next__"):
            raise streaming.not_a_generator_error(name, values)
        for index, value in streaming.replay(values, streamed[0]):
            if call is not None and call.cancelled:  # a cancelled actor call stops, as in Ray
                values.close()
                raise TaskCancelledError(f"actor call {name}() was cancelled")
            self._stream_value(stream, value)
            streamed[0] = index + 1

    async def _stream_async_values(
        self, stream: streaming.Stream, values: Any, streamed: list[int]
    ) -> None:
        """``_stream_values`` for an async generator method, on its actor's event loop."""
        async for index, value in streaming.areplay(values, streamed[0]):
            self._stream_value(stream, value)
            streamed[0] = index + 1

    def _stream_value(self, stream: streaming.Stream, value: Any) -> None:
        oid, entry = self._new_entry()
        self._store(entry, value)
        with stream.cond:
            stream.append(oid)

    def _end_stream(self, stream: streaming.Stream, error: BaseException | None) -> None:
        """The generator ended; its error, if any, is the stream's last value."""
        if error is not None:
            oid, entry = self._new_entry()
            self._store(entry, error=error)
            with stream.cond:
                stream.append(oid)
        with stream.cond:
            stream.end()
