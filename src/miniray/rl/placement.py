"""Where an RL actor runs, as it reports it: ``node_id()``, the node of the calling process.

Trainer ranks (``rl.trainer_group``) and rollout replicas (``rl.replicas``) answer it, so the
run's statistics say which node each one landed on (the two-node Ray cluster test checks them).
"""

from __future__ import annotations

import miniray

__all__ = ["node_id"]


def node_id() -> str:
    """The node this process runs on: Ray's node id in a Ray worker (where miniray itself is
    not initialised), else the embedded backend's."""
    try:
        import ray

        if ray.is_initialized():
            return str(ray.get_runtime_context().get_node_id())
    except ImportError:
        pass
    return str(miniray.get_runtime_context().get_node_id())
