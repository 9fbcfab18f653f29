"""Where an RL actor runs: the devices the driver plans, and the node each actor reports.

- ``replica_placement``: the device of each rollout replica (RL) or rollout worker
  (distillation), planned in the driver from the config and the CUDA devices it sees (pure).
- ``visible_device``: a planned ``cuda:<i>`` as the actor's own process numbers it. The
  embedded backends start actors that see every GPU of the machine, so ``cuda:<i>`` stands; a
  Ray actor with ``num_gpus=1`` sees only the GPU Ray gave it (Ray sets
  ``CUDA_VISIBLE_DEVICES``), which it calls ``cuda:0``.
- ``node_id()``: the node of the calling process. Trainer ranks (``rl.trainer_group``) and
  rollout replicas (``rl.replicas``) answer it, so the run's statistics say which node each
  one landed on (the two-node Ray cluster test checks them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import miniray

__all__ = [
    "ReplicaPlacement",
    "cuda_device_count",
    "local_device",
    "node_id",
    "replica_placement",
    "visible_device",
    "wants_cuda",
]


@dataclass(frozen=True)
class ReplicaPlacement:
    """Where the rollout replicas generate (``replica_placement``)."""

    device_type: str = "cpu"  # "cpu" | "cuda"
    first_gpu: int = 0  # the node's GPU of a node's first replica: the first after the trainer's
    per_node: int = 1  # replicas per node
    note: str | None = None  # a CPU fallback the user should hear about

    def device(self, index: int) -> str:
        """Replica ``index``'s device as its node numbers its GPUs (``visible_device`` turns
        it into the replica process's own numbering)."""
        if self.device_type == "cpu":
            return "cpu"
        return f"cuda:{self.first_gpu + index % self.per_node}"

    @property
    def num_gpus(self) -> int:
        """A replica's GPUs: Ray gives a replica that asks for none no CUDA device at all."""
        return 1 if self.device_type == "cuda" else 0


def replica_placement(
    rollout: Any, *, cuda_devices: int, trainer_gpus: int, single_node: bool
) -> ReplicaPlacement:
    """Where ``rollout`` (a config's ``rollout`` section) puts its replicas (pure).

    ``rollout.device``: ``cuda`` needs CUDA; ``auto`` takes it when some is visible and
    ``n_gpus_per_node`` asks for GPUs (0 keeps the one replica on the CPU, as before).
    On CUDA a replica has a GPU of its own: on a single node (``single_node``: the trainer
    and the rollout on one node each, the same one) they are the ``n_gpus_per_node`` GPUs
    after the trainer's ``trainer_gpus``, which must all be among ``cuda_devices``; on several
    nodes Ray places them (``num_gpus=1``). A trainer and a replica sharing one GPU are not
    planned: a verl user's fully asynchronous run gives each its own (its trainer and rollout
    pools), and two processes on one GPU would contend for its memory unseen.
    """
    wanted, per_node = rollout.device, rollout.n_gpus_per_node
    if wanted == "cuda" and cuda_devices == 0:
        raise ValueError(
            f"{rollout.key('device')}='cuda' is invalid here: no CUDA device is visible "
            "(torch.cuda.is_available() is False); use auto or cpu"
        )
    if wanted == "cuda" and per_node < 1:
        raise ValueError(
            f"{rollout.key('n_gpus_per_node')}={per_node} is invalid with "
            f"{rollout.key('device')}='cuda': must be >= 1 (the GPUs of each node's replicas)"
        )
    use_cuda = per_node >= 1 and wants_cuda(wanted, cuda_devices)
    if not use_cuda:
        note = None
        if per_node > 0:
            why = "rollout.device='cpu'" if wanted == "cpu" else "no CUDA device is visible"
            note = (
                f"{rollout.key('n_gpus_per_node')}={per_node} counts CPU processes ({why}): "
                f"{rollout.nnodes * per_node} rollout replica(s), each generating on the CPU"
            )
        return ReplicaPlacement(per_node=max(1, per_node), note=note)
    if single_node and trainer_gpus + per_node > cuda_devices:
        raise ValueError(
            f"{rollout.key('n_gpus_per_node')}={per_node} is invalid: the replicas' GPUs come "
            f"after the trainer's {trainer_gpus}, which needs {trainer_gpus + per_node} CUDA "
            f"devices on this node and {cuda_devices} are visible; lower it, or set "
            f"{rollout.key('device')}=cpu"
        )
    return ReplicaPlacement("cuda", first_gpu=trainer_gpus if single_node else 0, per_node=per_node)


def wants_cuda(device: str, cuda_devices: int) -> bool:
    """Whether a ``device`` key (``auto``, ``cpu``, ``cuda``; ``trainer.device``,
    ``rollout.device``) puts its processes on CUDA where ``cuda_devices`` are visible."""
    return device == "cuda" or (device == "auto" and cuda_devices > 0)


def cuda_device_count() -> int:
    """The CUDA devices this process sees (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def visible_device(device: str, visible: int) -> str:
    """``device`` (``cpu`` or ``cuda:<i>``, as the node numbers its GPUs) in a process that
    sees ``visible`` CUDA devices: the same where it sees them all, ``cuda:0`` where Ray made
    the one GPU it gave the actor its only one (pure)."""
    if not device.startswith("cuda"):
        return device
    if visible == 0:
        raise RuntimeError(
            f"this process was placed on {device} but sees no CUDA device "
            "(torch.cuda.is_available() is False here; CUDA_VISIBLE_DEVICES may be empty: on "
            "Ray an actor sees a GPU only if it asks for one, num_gpus); set rollout.device=cpu "
            "or trainer.device=cpu to run there on the CPU"
        )
    index = int(device.partition(":")[2] or 0)
    return f"cuda:{index % visible}"


def local_device(device: str) -> str:
    """``visible_device`` for the calling process."""
    if not device.startswith("cuda"):
        return device
    return visible_device(device, cuda_device_count())


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
