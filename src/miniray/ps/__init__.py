"""The parameter server: global weights that workers synchronize through.

    from miniray.ps import create_parameter_server
    ps = create_parameter_server('average')          # or 'weighted', 'momentum', 'median', ...
    miniray.get(ps.sync_from_workers.remote(workers))  # workers implement get/set_weights

See docs/ps.md for strategies, asynchronous push/pull, sharding, checkpoints and fault tolerance.
"""

from miniray.ps.results import PushResult, SyncResult
from miniray.ps.server import ParameterServer, ServerConfig, create_parameter_server
from miniray.ps.strategies import STRATEGIES, SyncStrategy

__all__ = [
    "STRATEGIES",
    "ParameterServer",
    "PushResult",
    "ServerConfig",
    "SyncResult",
    "SyncStrategy",
    "create_parameter_server",
]
