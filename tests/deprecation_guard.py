"""Fail a test when our code triggers a deprecation, wherever the warning is attributed.

A ``filterwarnings`` rule matches the module a warning is *attributed* to, which is the frame
``stacklevel`` points at. Libraries rarely point at us: transformers' ``deprecate_kwarg`` warns
with ``stacklevel=2`` from inside ``nn.Module.__call__``, so "`past_key_values` is deprecated"
is attributed to ``torch.nn.modules.module`` although our engine passed the argument. This
guard looks at the whole stack instead: a ``DeprecationWarning``, ``PendingDeprecationWarning``
or ``FutureWarning`` raised while a ``miniray`` frame is on the stack is raised as an error at
the call, so the test fails the day a removal is announced, not the day it lands.

transformers also announces some removals through its logger ("`past_key_values` ... are
deprecated"), not the warnings module; a handler on the loggers collects those records while our
code is on the stack, and the test fails at teardown (a logging handler cannot raise).

It covers the pytest process (engines, models, losses and configs are all tested in-process);
child processes of the local backend keep Python's default filters.
"""

from __future__ import annotations

import logging
import sys
import warnings

DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)

# (category, message prefix, why it is tolerated). Keep it empty unless a warning cannot be
# fixed in our code; every entry needs its reason.
TOLERATED: list[tuple[type[Warning], str, str]] = []


def miniray_frame(skip: int = 0) -> str | None:
    """The innermost frame of a ``miniray`` module on the current stack, as ``module:line``."""
    frame = sys._getframe(skip + 1)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if name == "miniray" or name.startswith("miniray."):
            return f"{name}:{frame.f_lineno}"
        frame = frame.f_back
    return None


def tolerated(message: Warning | str, category: type[Warning]) -> bool:
    text = str(message)
    return any(issubclass(category, c) and text.startswith(p) for c, p, _ in TOLERATED)


# Loggers whose deprecation notices we watch: the root and transformers' own root, which does
# not propagate.
WATCHED_LOGGERS = ("", "transformers")


class DeprecationLog(logging.Handler):
    """Collects logged deprecation notices emitted while a ``miniray`` frame is on the stack."""

    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.found: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if "deprecat" in text.lower() and not tolerated(text, FutureWarning):
            caller = miniray_frame()
            if caller is not None:
                self.found.append(f"{record.name}: {text} (logged while our code at {caller} ran)")


def install(loggers: tuple[str, ...] = WATCHED_LOGGERS):
    """Route warnings and logged deprecations through the guard until the returned function is
    called; that function returns the logged deprecation notices it collected."""
    previous = warnings.showwarning
    log = DeprecationLog()
    for name in loggers:
        logging.getLogger(name).addHandler(log)

    def guard(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, DEPRECATIONS) and not tolerated(message, category):
            caller = miniray_frame(1)
            if caller is not None:
                raise category(f"{message} (triggered by our code at {caller})")
        if previous is warnings._showwarning_orig:
            # pytest records warnings through the implementation hook, not showwarning.
            warnings._showwarnmsg_impl(
                warnings.WarningMessage(message, category, filename, lineno, file, line)
            )
        else:
            previous(message, category, filename, lineno, file, line)

    warnings.showwarning = guard

    def uninstall() -> list[str]:
        warnings.showwarning = previous
        for name in loggers:
            logging.getLogger(name).removeHandler(log)
        return log.found

    uninstall.found = log.found  # type: ignore[attr-defined]  # read while still installed
    return uninstall
