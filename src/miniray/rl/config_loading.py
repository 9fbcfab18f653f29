"""Loading the RL config tree (``config``): bundled config names, YAML files, Hydra-style command
lines, and the ``async_training`` section from whatever a user passes.

    cfg = load_rl_config("e2e_minimal", overrides=["async_training.max_queue_size=500"])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from miniray.config import Config, from_dict, load
from miniray.rl.config import CONFIG_DIR, DEFAULT_CONFIG_NAME, AsyncTrainingConfig, RLConfig

# Bundled configs of another entry point, which shares this directory: name -> its command.
_OTHER_ENTRY_POINTS = {"on_policy_distill_trainer": "python -m miniray.rl.distill.main"}


def config_names() -> list[str]:
    """Names of the bundled YAML configs of async RL (``load_rl_config(name)``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if p.stem not in _OTHER_ENTRY_POINTS)


def load_rl_config(
    config_name: str | Path = DEFAULT_CONFIG_NAME,
    *,
    overrides: Sequence[str] = (),
    data: Mapping[str, Any] | None = None,
) -> RLConfig:
    """Dataclass defaults <- a bundled config name or a YAML path <- ``data`` <- overrides."""
    return load(RLConfig, config_file(config_name, config_names()), data=data, overrides=overrides)


def parse_rl_args(argv: Sequence[str]) -> RLConfig:
    """A config from command-line words, Hydra-style as in the seeds::

        --config-name=e2e_minimal [--config-path=DIR] async_training.max_queue_size=500 ...

    ``--config-name`` is a bundled name or a YAML path (``--config-path`` is a directory to look
    it up in); every other word is a dotted override.
    """
    name, overrides = split_config_args(argv, DEFAULT_CONFIG_NAME)
    return load_rl_config(name, overrides=overrides)


def split_config_args(argv: Sequence[str], default_name: str) -> tuple[str | Path, list[str]]:
    """``(config name or YAML path, dotted overrides)`` from Hydra-style words:
    ``--config-name=NAME [--config-path=DIR] key=value ...`` (a flag's value may also be the
    next word). Shared by every entry point that takes a config."""
    name: str | Path = default_name
    config_dir: Path | None = None
    overrides: list[str] = []
    words = list(argv)
    while words:
        word = words.pop(0)
        if not word.startswith("--"):
            overrides.append(word)
            continue
        flag, eq, value = word.partition("=")
        if flag not in ("--config-name", "--config-path"):
            raise ValueError(
                f"unknown option {flag!r}: known options are ['--config-name', "
                "'--config-path']; everything else is key=value"
            )
        if not eq:
            if not words:
                raise ValueError(f"option {flag} needs a value: {flag}=VALUE")
            value = words.pop(0)
        if flag == "--config-name":
            name = value
        else:
            config_dir = Path(value)
    if config_dir is not None:
        name = config_dir / (name if str(name).endswith((".yaml", ".yml")) else f"{name}.yaml")
    return name, overrides


def config_file(config_name: str | Path, known: Sequence[str]) -> Path:
    """The YAML file of a bundled config name (one of ``known``) or of a path."""
    path = Path(config_name)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist")
        return path
    bundled = CONFIG_DIR / f"{config_name}.yaml"
    if str(config_name) not in known or not bundled.is_file():
        command = _OTHER_ENTRY_POINTS.get(str(config_name))
        hint = f" ({config_name} is the config of `{command}`)" if command else ""
        raise ValueError(
            f"config_name={str(config_name)!r} is unknown: must be a YAML path or one of "
            f"{list(known)}{hint}"
        )
    return bundled


_TOP_LEVEL = {
    "data",
    "actor_rollout_ref",
    "async_training",
    "trainer",
    "rollout",
    "algorithm",
    "custom_reward_function",
}


def async_training_config(config: Any = None) -> AsyncTrainingConfig:
    """The ``async_training`` section from whatever a user passes as ``config``.

    Accepts ``None`` (defaults), an ``RLConfig``, an ``AsyncTrainingConfig``, or a plain dict /
    OmegaConf config that is either the whole tree (``{"async_training": {...}, ...}``) or the
    section itself (``{"staleness_threshold": 2}``). The queue and the synchronizer need only
    this section, so they work without data files or a model path.
    """
    if config is None:
        return AsyncTrainingConfig()
    if isinstance(config, AsyncTrainingConfig):
        return config
    if isinstance(config, RLConfig):
        return config.async_training
    if isinstance(config, Config):
        raise TypeError(
            f"config must be an RLConfig, an AsyncTrainingConfig or a mapping, "
            f"got a {type(config).__name__}"
        )
    if type(config).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        config = OmegaConf.to_container(config, resolve=True)
    if not isinstance(config, Mapping):
        raise TypeError(
            f"config must be an RLConfig, an AsyncTrainingConfig or a mapping, "
            f"got {type(config).__name__}: {config!r}"
        )
    if "async_training" in config:
        return from_dict(AsyncTrainingConfig, config["async_training"], path="async_training")
    if config and set(config) <= _TOP_LEVEL:
        return AsyncTrainingConfig()
    return from_dict(AsyncTrainingConfig, config, path="async_training")
