"""The stale-synchronous-parallel (SSP) admission rule, as pure functions.

A worker pulls ``(version, weights)``, trains, and pushes its update tagged with that version.
Its staleness at push time is ``server_version - version_started_from``: how many global updates
happened meanwhile. With bound s, a push is admitted iff ``staleness <= s``. s = 0 admits only
updates computed on the current weights (with ``pushes_per_version = K`` that is exactly a
synchronous round of K workers); ``None`` means no bound (fully asynchronous).
"""

from __future__ import annotations


def staleness(server_version: int, version_started_from: int) -> int:
    """Versions that passed since the worker pulled; a version from the future is a bug."""
    if isinstance(version_started_from, bool) or not isinstance(version_started_from, int):
        raise ValueError(
            f"push: version={version_started_from!r} must be the int version returned by pull()"
        )
    if version_started_from > server_version or version_started_from < 0:
        raise ValueError(
            f"push: version={version_started_from} is not a version this server has published "
            f"(current version is {server_version}); pass the version returned by pull()"
        )
    return server_version - version_started_from


def admits(age: int, bound: int | None) -> bool:
    """True iff an update of this age may be applied under the bound."""
    return bound is None or age <= bound


def damping(age: int, enabled: bool) -> float:
    """Scale for a stale update: 1/(1 + age) when enabled (stale directions count less)."""
    return 1.0 / (1.0 + age) if enabled else 1.0
