"""Ray's name for the module of runtime errors: ``miniray.exceptions.GetTimeoutError`` etc."""

from miniray.errors import *  # noqa: F403
from miniray.errors import __all__  # noqa: F401
