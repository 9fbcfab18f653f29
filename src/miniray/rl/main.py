"""Entry point of an RL run from a config: ``python -m miniray.rl.main --config-name=NAME k=v ...``

The config is a bundled name (``fully_async_ppo``, ``e2e_minimal``, ``performance``) or a YAML
path, plus dotted overrides as in verl (``async_training.max_queue_size=500``); an unknown key is
an error naming it. The model is any causal LM in a local directory
(``actor_rollout_ref.model.path``); prompts come from ``data.train_files`` (parquet or JSONL),
held-out prompts from ``data.val_files``. Prints the run's summary as one JSON line at the end.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from miniray.rl.config_loading import parse_rl_args
from miniray.rl.loop import run
from miniray.rl.tasks import load_prompts


def main(argv: Sequence[str] | None = None) -> dict:
    words = list(sys.argv[1:] if argv is None else argv)
    if any(w in ("-h", "--help") for w in words):
        print(__doc__)
        return {}
    config = parse_rl_args(words)
    data = config.data
    eval_rows = [
        row
        for path in data.val_files
        for row in load_prompts(path, prompt_key=data.prompt_key, answer_key=data.answer_key)
    ]
    result = run(config, eval_rows=eval_rows, log_dir=config.trainer.default_local_dir)
    print(json.dumps(result.summary))
    return result.summary


if __name__ == "__main__":
    main()
