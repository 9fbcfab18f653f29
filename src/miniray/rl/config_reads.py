"""Which config keys the code reads (``record_reads``), and the keys accepted only at the values
this version supports (``Refusal``, ``check_refused``): no key is a silent no-op."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from miniray import config as config_machinery
from miniray.config import Config

# -- which keys the code reads ----------------------------------------------------------------
# A key that nothing reads is a silent no-op: the user sets it and the run ignores it. Every
# key is therefore read by the code it names, or listed in ``REFUSED`` (values above what this
# version supports are errors); tests/rl/test_rl_config_reads.py checks both trees.


@dataclass(frozen=True)
class Refusal:
    """The values of a key this version supports (``allowed``, said as ``rule``), and why
    the others are refused rather than ignored."""

    allowed: Any  # value -> bool
    rule: str
    why: str


def at_most(limit: int, why: str) -> Refusal:
    return Refusal(lambda value: value <= limit, f"must be <= {limit}", why)


def check_refused(root: Config, refused: Mapping[str, Refusal]) -> None:
    """Raise for the first key of ``refused`` whose value in the tree ``root`` this version
    does not support, naming the key, the value, the rule and why."""
    for key, refusal in refused.items():
        node: Any = root
        for part in key.split("."):
            node = object.__getattribute__(node, part)  # not a read by the code: a check
        if not refusal.allowed(node):
            raise ValueError(f"{key}={node!r} is refused: {refusal.rule}; {refusal.why}")


_MACHINERY_FILES = {config_machinery.__file__, dataclasses.__file__, "<string>"}
_PACKAGE_DIR = str(Path(__file__).resolve().parents[1])
# Methods of a config that read their own fields to check or show them, not to act on them.
_NOT_READERS = {"validate", "__post_init__", "__eq__", "__repr__", "__hash__"}


class _ReadRecorder:
    """Collects ``Config`` field reads made by miniray's code, from every thread."""

    def __init__(self) -> None:
        self.keys: set[str] = set()
        self.lock = threading.Lock()
        self.fields: dict[type, frozenset[str]] = {}

    def field_names(self, cls: type) -> frozenset[str]:
        names = self.fields.get(cls)
        if names is None:
            names = self.fields[cls] = frozenset(f.name for f in dataclasses.fields(cls))
        return names

    def reader_is_code(self) -> bool:
        """Whether the read two frames up (past our hook) is by miniray's code acting on the
        value: dict-style reads (``cfg.get``, ``cfg[...]``) count for their caller."""
        frame = sys._getframe(2)
        code = frame.f_code
        if code.co_filename == config_machinery.__file__ and code.co_name in ("get", "__getitem__"):
            caller = frame.f_back
            if caller is None:
                return False
            code = caller.f_code
        return (
            code.co_filename not in _MACHINERY_FILES
            and code.co_name not in _NOT_READERS
            and code.co_filename.startswith(_PACKAGE_DIR)
        )


_recorders: list[_ReadRecorder] = []
_recording_lock = threading.Lock()


def _recording_getattribute(self: Config, name: str) -> Any:
    value = object.__getattribute__(self, name)
    if _recorders and not name.startswith("_"):
        for recorder in list(_recorders):
            if name in recorder.field_names(type(self)) and recorder.reader_is_code():
                path = self.__dict__.get("_config_path", "")
                key = f"{path}.{name}" if path else name
                with recorder.lock:
                    recorder.keys.add(key)
    return value


@contextlib.contextmanager
def record_reads() -> Iterator[set[str]]:
    """Record the dotted keys miniray's code reads from any ``Config`` while the block runs,
    in every thread of this process (the inline backend runs actors in threads; actors in
    other processes are not seen). Yields the set, filled as reads happen.

    Reads by the config machinery and by ``validate`` do not count: they check a value, they
    do not act on it. For the tests; it slows every attribute read of a config.
    """
    recorder = _ReadRecorder()
    with _recording_lock:
        if not _recorders:
            Config.__getattribute__ = _recording_getattribute  # type: ignore[method-assign,assignment]
        _recorders.append(recorder)
    try:
        yield recorder.keys
    finally:
        with _recording_lock:
            _recorders.remove(recorder)
            if not _recorders:
                del Config.__getattribute__


SCALE_OUT = (
    "this version runs each role in one process on one device; more arrives with the "
    "scale-out issues (multi-GPU, multi-node), until then set 1"
)
