"""On-policy distillation (GKD): a teacher server, its client, and the student's training.

The teacher side: ``teacher_server`` (a broker process, ``teacher_broker``, and
``n_server_workers`` model processes, ``teacher_worker``, started with ``python -m
miniray.rl.distill.teacher_server`` or ``start_teacher_server``), ``TeacherClient``
(microbatched, deadline-bound scoring with reconnects and partial results) and ``wire``
(msgpack + raw tensor frames, never pickle).

The student side: ``losses`` (forward/reverse KL, generalized JSD, top-k support, the lmbda
rule), ``scheduler`` (serial / one_step_off / two_step_off), ``weight_sync``
(``sync_rollout_weights`` with its timeout and the seed's log lines), ``rollout_worker``,
``dispatch`` (a batch's chunks to the rollout workers by pull, surviving a dead or hung one),
``trainer`` (``DistillTrainer``), ``loop`` (``run_distillation``), ``main`` (the entry point),
``config`` and ``measure`` (serial vs one_step_off wall time).

Names resolve on first use (``__getattr__``): running ``python -m
miniray.rl.distill.teacher_server`` imports this package first, and the server's broker
process should not pay for torch or transformers, which it never uses.
"""

import importlib

# public name -> the module that defines it
_EXPORTS = {
    "TeacherClient": "teacher_client",
    "TeacherError": "teacher_client",
    "TeacherScores": "teacher_client",
    "TeacherTimeoutError": "teacher_client",
    "TeacherServerHandle": "teacher_server",
    "start_teacher_server": "teacher_server",
}
# The student side.
_EXPORTS.update(
    {
        "DistillBatch": "trainer",
        "DistillConfig": "config",
        "DistillResult": "loop",
        "DistillTrainer": "trainer",
        "LocalTeacher": "local_teacher",
        "RolloutWeightSyncError": "weight_sync",
        "RolloutWeightSyncTimeoutError": "weight_sync",
        "RolloutWorker": "rollout_worker",
        "WorkersLostError": "dispatch",
        "distillation_loss": "losses",
        "generalized_jsd": "losses",
        "is_on_policy": "losses",
        "load_distill_config": "config",
        "measure_schedules": "measure",
        "run_distillation": "loop",
        "run_schedule": "scheduler",
        "sync_rollout_weights": "weight_sync",
    }
)

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
