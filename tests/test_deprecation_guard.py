"""The guard that fails a test when our code triggers a deprecation (deprecation_guard.py)."""

from __future__ import annotations

import logging
import warnings

import pytest

from deprecation_guard import install


def run_as_module(module: str, code: str, **names):
    """Run ``code`` with ``module`` as its ``__name__``: a frame the guard sees as that module."""
    exec(compile(code, f"<{module}>", "exec"), {"__name__": module, **names})


LIBRARY_WARNS = """
def library_call():
    # A library function warning about its caller's argument, attributed one frame up (as
    # transformers' deprecate_kwarg under nn.Module.__call__ does).
    warnings.warn("`old` is deprecated", FutureWarning, stacklevel=2)
"""


@pytest.mark.parametrize("category", [FutureWarning, DeprecationWarning])
def test_a_library_deprecation_triggered_by_our_code_is_an_error(category):
    names: dict = {"warnings": warnings, "__name__": "somelib"}
    exec(LIBRARY_WARNS.replace("FutureWarning", category.__name__), names)
    library_call = names["library_call"]
    uninstall = install(loggers=())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            with pytest.raises(category, match=r"triggered by our code at miniray\.engine:2"):
                run_as_module("miniray.engine", "\nlibrary_call()\n", library_call=library_call)
            # The same call from a module that is not ours is only recorded, as pytest does.
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                run_as_module("user_script", "library_call()", library_call=library_call)
    finally:
        uninstall()
    assert [str(w.message) for w in seen] == ["`old` is deprecated"]


def test_other_warnings_from_our_code_pass():
    uninstall = install(loggers=())
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            run_as_module("miniray.x", "warnings.warn('slow path', UserWarning)", warnings=warnings)
    finally:
        uninstall()
    assert [w.category for w in seen] == [UserWarning]


def test_logged_deprecations_while_our_code_runs_are_collected():
    logger = logging.getLogger("guard_test_library")
    logger.propagate = False  # the suite's own guard watches the root logger
    uninstall = install(loggers=("guard_test_library",))
    try:
        run_as_module(
            "miniray.engine", "logger.warning('`a` is deprecated, use `b`')", logger=logger
        )
        run_as_module("user_script", "logger.warning('`c` is deprecated')", logger=logger)
        run_as_module("miniray.engine", "logger.warning('cache is cold')", logger=logger)
    finally:
        found = uninstall()
    assert len(found) == 1 and "`a` is deprecated" in found[0] and "miniray.engine" in found[0]
