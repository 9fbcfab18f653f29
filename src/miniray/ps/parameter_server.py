"""The seed's module name for the server (``miniray/ps/parameter_server.py``); see ``server``."""

from miniray.ps.server import ParameterServer, ServerConfig, create_parameter_server

__all__ = ["ParameterServer", "ServerConfig", "create_parameter_server"]
