"""RL errors: one class per name, importable from where users meet them, pickled with fields."""

from __future__ import annotations

import pickle

import pytest

import miniray.rl
import miniray.rl.distill as distill
from miniray.errors import GetTimeoutError
from miniray.rl import errors
from miniray.rl.distill import scheduler, weight_sync
from miniray.rl.types import SyncResult


def test_each_error_is_one_class_wherever_it_is_imported_from():
    # scheduler.py once defined its own TeacherTimeoutError: `except` on the public one missed it.
    assert (
        scheduler.TeacherTimeoutError is distill.TeacherTimeoutError is errors.TeacherTimeoutError
    )
    assert scheduler.GenerationTimeoutError is errors.GenerationTimeoutError
    assert distill.TeacherError is errors.TeacherError
    assert weight_sync.RolloutWeightSyncError is errors.RolloutWeightSyncError
    for name in (
        "ParameterSyncError",
        "ParameterSyncTimeoutError",
        "ProducerCrashedError",
        "QueueTimeoutError",
    ):
        assert getattr(miniray.rl, name) is getattr(errors, name)


def test_timeouts_are_builtin_timeout_errors():
    for cls in (
        errors.QueueTimeoutError,
        errors.ParameterSyncTimeoutError,
        errors.RolloutWeightSyncTimeoutError,
        errors.TeacherTimeoutError,
        errors.GenerationTimeoutError,
        errors.CallTimeoutError,
    ):
        assert issubclass(cls, TimeoutError), cls
    assert issubclass(errors.TeacherTimeoutError, GetTimeoutError)
    assert issubclass(errors.CallTimeoutError, GetTimeoutError)
    assert issubclass(errors.RolloutWeightSyncTimeoutError, errors.ParameterSyncError)


@pytest.mark.parametrize(
    "error, fields",
    [
        (errors.ProducerCrashedError("closed", "boom"), {"producer_error": "boom"}),
        (
            errors.ParameterSyncError("failed", SyncResult("failed", 3, 2, 2)),
            {"result": SyncResult("failed", 3, 2, 2)},
        ),
        (
            errors.RolloutWeightSyncTimeoutError(
                "late", failures={"worker 1": "no answer"}, elapsed_s=2.5, version=7
            ),
            {"failures": {"worker 1": "no answer"}, "elapsed_s": 2.5, "version": 7},
        ),
        (
            errors.TeacherTimeoutError(
                "no answer", address="tcp://127.0.0.1:1", missing_microbatches=[0, 2]
            ),
            {"code": "timeout", "address": "tcp://127.0.0.1:1", "missing_microbatches": [0, 2]},
        ),
        (
            errors.CallTimeoutError("late", what="load_weights() of a"),
            {"what": "load_weights() of a"},
        ),
    ],
)
def test_errors_survive_pickling_with_their_fields(error, fields):
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    for name, value in fields.items():
        assert getattr(copy, name) == value, name
