"""Parameter-server checkpoints: a directory with ``tensors.safetensors`` and ``state.json``.

Tensors (global weights ``weight.<i>``, strategy state ``strategy.<key>``, server-optimizer
state ``server_opt.<key>``) go to safetensors: no pickle, so loading a checkpoint cannot run
code. Everything else (version, counters, worker weights) is small JSON. Both files are written
to temporary names and renamed, so a crash mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

TENSORS_FILE = "tensors.safetensors"
STATE_FILE = "state.json"
FORMAT_VERSION = 1


def save(path: str, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    # safetensors refuses views that share storage; contiguous clones make every entry its own.
    owned = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    tmp_tensors = os.path.join(path, TENSORS_FILE + ".tmp")
    tmp_state = os.path.join(path, STATE_FILE + ".tmp")
    save_file(owned, tmp_tensors)
    with open(tmp_state, "w") as f:
        json.dump({"format_version": FORMAT_VERSION, **state}, f, indent=2, sort_keys=True)
    os.replace(tmp_tensors, os.path.join(path, TENSORS_FILE))
    os.replace(tmp_state, os.path.join(path, STATE_FILE))


def load(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors.torch import load_file

    tensors_path = os.path.join(path, TENSORS_FILE)
    state_path = os.path.join(path, STATE_FILE)
    for p in (tensors_path, state_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(
                f"load_checkpoint: {p} does not exist; is {path!r} a checkpoint?"
            )
    with open(state_path) as f:
        state = json.load(f)
    if state.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"load_checkpoint: {state_path} has format_version={state.get('format_version')!r}; "
            f"this miniray reads {FORMAT_VERSION}"
        )
    return load_file(tensors_path), state


def split_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Entries under ``prefix.`` with the prefix removed."""
    p = prefix + "."
    return {k[len(p) :]: v for k, v in tensors.items() if k.startswith(p)}


def weight_list(tensors: dict[str, torch.Tensor]) -> list[torch.Tensor] | None:
    weights = split_prefix(tensors, "weight")
    if not weights:
        return None
    return [weights[str(i)] for i in range(len(weights))]
