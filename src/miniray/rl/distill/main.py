"""Entry point of an on-policy distillation run (verl's ``python -m recipe.gkd.main_gkd``)::

    python -m miniray.rl.distill.main --config-name=on_policy_distill_trainer \\
        actor_rollout_ref.model.path=STUDENT_DIR data.train_files=train.parquet \\
        actor_rollout_ref.teacher.server_ip=127.0.0.1 actor_rollout_ref.teacher.server_port=15555 \\
        trainer.scheduler=one_step_off actor_rollout_ref.nccl_timeout=300 ...

The teacher is a running teacher server at ``server_ip:server_port``, or, with
``actor_rollout_ref.teacher.launch=true actor_rollout_ref.teacher.model_path=TEACHER_DIR``, one
this run starts (and stops). ``--config-name`` is the bundled ``on_policy_distill_trainer`` or a
YAML path (``--config-path=DIR`` looks it up there); every other word is a dotted override, and
an unknown key is an error naming it. Metrics go to
``trainer.default_local_dir/trainer.experiment_name/metrics.jsonl``; the last line printed is
the run's summary as JSON.
"""

from __future__ import annotations

import json
import logging
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

from miniray.rl.distill.config import parse_distill_args
from miniray.rl.distill.loop import run_distillation


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    words = list(sys.argv[1:] if argv is None else argv)
    if any(w in ("-h", "--help") for w in words):
        print(__doc__)
        return {}
    config = parse_distill_args(words)
    if not logging.getLogger().handlers:  # the seed's weight-sync lines go to stderr
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    t = config.trainer
    log_dir = pathlib.Path(t.default_local_dir) / t.experiment_name
    result = run_distillation(config, log_dir=log_dir)
    (log_dir / "summary.json").write_text(json.dumps(result.summary, indent=1) + "\n")
    print(json.dumps(result.summary), flush=True)
    return result.summary


if __name__ == "__main__":
    main()
