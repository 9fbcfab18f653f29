"""The options ``@remote(...)`` and ``.options(...)`` accept, with Ray's defaults.

Unknown options are an error that lists the known ones: a typo such as ``max_restart=3`` would
otherwise silently give an actor that never restarts.
"""

from __future__ import annotations

from typing import Any

# Accepted for compatibility with Ray scripts; scheduling by resources is Ray's job (backend="ray").
_RESOURCE_OPTIONS = {
    "num_cpus": None,
    "num_gpus": None,
    "resources": None,
    "memory": None,
    "accelerator_type": None,
    "scheduling_strategy": None,
    "runtime_env": None,
    "label_selector": None,
}

TASK_DEFAULTS: dict[str, Any] = {
    **_RESOURCE_OPTIONS,
    "num_returns": 1,
    "max_retries": 3,
    "retry_exceptions": False,
    "max_calls": 0,
    "name": None,
}

ACTOR_DEFAULTS: dict[str, Any] = {
    **_RESOURCE_OPTIONS,
    "max_restarts": 0,
    "max_task_retries": 0,
    "max_concurrency": None,  # 1 for sync actors, 1000 for async actors, as in Ray
    "max_pending_calls": -1,
    "name": None,
    "namespace": None,
    "get_if_exists": False,
    "lifetime": None,
    "concurrency_groups": None,
}

METHOD_DEFAULTS: dict[str, Any] = {
    "num_returns": 1,
    "max_task_retries": None,
    "retry_exceptions": False,
    "concurrency_group": None,
}


def validate(kind: str, options: dict[str, Any]) -> dict[str, Any]:
    """Check option names and values for ``kind`` in {'task', 'actor', 'method'}."""
    defaults = {"task": TASK_DEFAULTS, "actor": ACTOR_DEFAULTS, "method": METHOD_DEFAULTS}[kind]
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(
            f"unknown {kind} option(s) {unknown}; known options are {sorted(defaults)}"
        )
    _check_num_returns(kind, options)
    _check_int(options, "max_retries", minimum=-1)
    _check_int(options, "max_restarts", minimum=-1)
    _check_int(options, "max_task_retries", minimum=-1)
    _check_int(options, "max_calls", minimum=0)
    concurrency = options.get("max_concurrency")
    if concurrency is not None:
        _check_int(options, "max_concurrency", minimum=1)
    name = options.get("name")
    if name is not None and (not isinstance(name, str) or not name):
        raise ValueError(f"option name={name!r} must be a non-empty string")
    namespace = options.get("namespace")
    if namespace is not None and (not isinstance(namespace, str) or not namespace):
        raise ValueError(f"option namespace={namespace!r} must be None or a non-empty string")
    lifetime = options.get("lifetime")
    if lifetime not in (None, "non_detached", "detached"):
        raise ValueError(f"option lifetime={lifetime!r} must be None, 'non_detached' or 'detached'")
    retry = options.get("retry_exceptions")
    if retry is not None and not isinstance(retry, bool):
        if not isinstance(retry, (list, tuple)) or not all(
            isinstance(c, type) and issubclass(c, BaseException) for c in retry
        ):
            raise ValueError(
                f"option retry_exceptions={retry!r} must be a bool or a list of exception classes"
            )
    return options


# Placement and environment options that only Ray's scheduler can honour. Refusing them beats
# ignoring them: a user who asks for a runtime_env must not get a silently different process.
_RAY_ONLY = ("runtime_env", "concurrency_groups", "label_selector", "accelerator_type")


def check_embedded(options: dict[str, Any], backend: str) -> None:
    """Reject options the embedded backends cannot honour, naming the way out."""
    for key in _RAY_ONLY:
        if options.get(key) is not None:
            raise ValueError(
                f"option {key}={options[key]!r} is not supported by the {backend} backend; "
                "use backend='ray' for it"
            )
    if options.get("lifetime") == "detached":
        raise ValueError(
            f"option lifetime='detached' is not supported by the {backend} backend: its actors "
            "end with the driver. Use backend='ray' for detached actors."
        )
    strategy = options.get("scheduling_strategy")
    if strategy is not None and strategy not in ("DEFAULT", "SPREAD"):
        raise ValueError(
            f"option scheduling_strategy={strategy!r} is not supported by the {backend} backend "
            "(only 'DEFAULT' and 'SPREAD', which mean the same on one machine)"
        )


def task_wire_options(options: dict[str, Any]) -> dict[str, Any]:
    """What a task carries to the process that runs it (the rest is the caller's business)."""
    return {k: options[k] for k in ("num_returns", "max_retries", "retry_exceptions", "max_calls")}


def call_wire_options(options: dict[str, Any]) -> dict[str, Any]:
    """What an actor call carries; ``max_task_retries`` None means the actor's own setting."""
    return {
        "num_returns": options["num_returns"],
        "max_task_retries": options.get("max_task_retries"),
        "retry_exceptions": options.get("retry_exceptions", False),
    }


def _check_num_returns(kind: str, options: dict[str, Any]) -> None:
    value = options.get("num_returns")
    if value == "streaming":
        return  # a generator task or method (ObjectRefGenerator); refs checks that it yields
    if value == "dynamic":
        raise ValueError(
            "option num_returns='dynamic' (Ray's deprecated dynamic generators) is not "
            "supported by miniray: use num_returns='streaming' on a generator function or method"
        )
    _check_int(options, "num_returns", minimum=0)


def _check_int(options: dict[str, Any], key: str, *, minimum: int) -> None:
    if key not in options:
        return
    value = options[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"option {key}={value!r} must be an integer >= {minimum}")


def merged(kind: str, base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    validate(kind, overrides)
    out = dict(base)
    out.update(overrides)
    return out


def resolved(kind: str, given: dict[str, Any]) -> dict[str, Any]:
    """Given options filled up with the defaults."""
    defaults = {"task": TASK_DEFAULTS, "actor": ACTOR_DEFAULTS, "method": METHOD_DEFAULTS}[kind]
    out = dict(defaults)
    out.update(given)
    return out
