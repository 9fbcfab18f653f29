"""miniray: a small toolkit for distributed training with Ray's API.

    import miniray as ray   # scripts using Ray's core subset run unchanged

The runtime lives in ``miniray.runtime``; the parameter server in ``miniray.ps``, the training
framework in ``miniray.train`` and asynchronous RL post-training in ``miniray.rl``.
"""

from miniray import actor, exceptions
from miniray.runtime.api import (
    backend_name,
    cancel,
    get,
    get_actor,
    get_runtime_context,
    init,
    is_initialized,
    kill,
    method,
    put,
    remote,
    shutdown,
    wait,
)
from miniray.runtime.refs import (
    ActorClass,
    ActorHandle,
    ObjectRef,
    ObjectRefGenerator,
    RemoteFunction,
)

__version__ = "0.1.0"

__all__ = [
    "ActorClass",
    "ActorHandle",
    "ObjectRef",
    "ObjectRefGenerator",
    "RemoteFunction",
    "actor",
    "backend_name",
    "cancel",
    "exceptions",
    "get",
    "get_actor",
    "get_runtime_context",
    "init",
    "is_initialized",
    "kill",
    "method",
    "put",
    "remote",
    "shutdown",
    "wait",
]
