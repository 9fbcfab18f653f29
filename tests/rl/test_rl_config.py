"""The config machinery (miniray.config) and the RL config tree (miniray.rl.config)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

import pytest

from miniray.config import (
    Config,
    config_keys,
    describe,
    from_dict,
    load,
    option,
    parse_override,
    parse_overrides,
    read_yaml,
)
from miniray.rl.config import CONFIG_DIR, AsyncTrainingConfig, DataConfig, RLConfig
from miniray.rl.config_loading import (
    async_training_config,
    config_names,
    load_rl_config,
    parse_rl_args,
)

REQUIRED = ["data.train_files=[a.jsonl]", "actor_rollout_ref.model.path=/models/tiny"]


@dataclass(kw_only=True)
class Inner(Config):
    size: int = option(4, ge=1)
    ratio: float = option(0.5, ge=0, le=1)
    name: str = "x"
    flag: bool = False
    mode: Literal["fast", "slow"] = "fast"
    maybe: int | None = None
    files: list[str] = option(default_factory=list)  # noqa: RUF009
    extra: dict[str, int] = option(default_factory=dict)  # noqa: RUF009


@dataclass(kw_only=True)
class Outer(Config):
    inner: Inner = field(default_factory=Inner)
    required_path: str = option(help="must be given")


# -- machinery --------------------------------------------------------------------------------
def test_parse_override_reads_yaml_values():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=0.5") == (["a"], 0.5)
    assert parse_override("a=true") == (["a"], True)
    assert parse_override("a=null") == (["a"], None)
    assert parse_override("a=[x, y]") == (["a"], ["x", "y"])
    assert parse_override("a=b=c") == (["a"], "b=c")
    assert parse_overrides(["a.b=1", "a.c=2", "a.b=3"]) == {"a": {"b": 3, "c": 2}}
    with pytest.raises(ValueError, match="must look like key=value"):
        parse_override("async_training.max_queue_size")
    with pytest.raises(ValueError, match="empty part"):
        parse_override("a..b=1")
    with pytest.raises(ValueError, match="conflicts"):
        parse_overrides(["a=1", "a.b=2"])


def test_values_are_coerced_to_the_declared_types():
    cfg = from_dict(
        Outer,
        {
            "required_path": 42,  # YAML read a number; the field wants text
            "inner": {
                "size": "8",
                "ratio": 1,
                "flag": "yes",
                "maybe": 3.0,
                "files": "one.jsonl",
                "extra": {"a": 1},
            },
        },
    )
    assert cfg.required_path == "42"
    assert (cfg.inner.size, cfg.inner.ratio, cfg.inner.flag) == (8, 1.0, True)
    assert isinstance(cfg.inner.ratio, float)
    assert cfg.inner.maybe == 3 and cfg.inner.files == ["one.jsonl"]
    assert cfg.inner.extra == {"a": 1}


@pytest.mark.parametrize(
    ("data", "error", "pattern"),
    [
        ({"inner": {"size": 0}}, ValueError, r"inner\.size=0 is invalid: must be >= 1"),
        ({"inner": {"ratio": 1.5}}, ValueError, r"inner\.ratio=1\.5 is invalid: must be <= 1"),
        ({"inner": {"size": 2.5}}, TypeError, r"inner\.size=2\.5 is invalid: must be an integer"),
        ({"inner": {"size": True}}, TypeError, "not a boolean"),
        ({"inner": {"flag": "maybe"}}, TypeError, r"inner\.flag='maybe'.*true or false"),
        ({"inner": {"mode": "fsat"}}, ValueError, "must be one of.*did you mean 'fast'"),
        ({"inner": {"name": ["a"]}}, TypeError, "must be a string"),
        ({"inner": {"extra": {"a": "b"}}}, TypeError, r"inner\.extra\.a='b'"),
        ({"inner": 3}, TypeError, "must be a mapping of Inner fields"),
        ({"inner": {"sise": 3}}, ValueError, "unknown config key 'inner.sise'.*'inner.size'"),
        ({"size": 3}, ValueError, "unknown config key 'size'.*did you mean 'inner.size'"),
    ],
)
def test_bad_values_name_the_key_the_value_and_the_rule(data, error, pattern):
    with pytest.raises(error, match=pattern):
        from_dict(Outer, {"required_path": "p", **data})


def test_required_keys_must_be_set():
    with pytest.raises(ValueError, match="required_path is required"):
        from_dict(Outer, {})
    with pytest.raises(ValueError, match="required_path is required"):
        from_dict(Outer, {"required_path": "???"})


def test_direct_construction_accepts_plain_dicts_and_validates():
    cfg = Outer(required_path="p", inner={"size": 9})
    assert isinstance(cfg.inner, Inner) and cfg.inner.size == 9
    with pytest.raises(ValueError, match=r"inner\.size=-1"):
        Outer(required_path="p", inner={"size": -1})
    with pytest.raises(ValueError, match=r"^size=0 is invalid"):
        Inner(size=0)


def test_dict_style_reads_and_round_trip():
    cfg = from_dict(Outer, {"required_path": "p"})
    assert cfg.inner.get("size", 1) == 4 and cfg.inner.get("nope", 7) == 7
    assert cfg["inner"]["mode"] == "fast" and "size" in cfg.inner
    with pytest.raises(KeyError, match=r"did you mean 'inner\.size'"):
        cfg.inner["sizes"]
    assert from_dict(Outer, cfg.to_dict()) == cfg
    changed = cfg.with_overrides("inner.size=5")
    assert changed.inner.size == 5 and cfg.inner.size == 4
    assert config_keys(Outer)[:2] == ["inner.size", "inner.ratio"]


def test_omegaconf_containers_are_accepted():
    from omegaconf import OmegaConf

    data = OmegaConf.create({"required_path": "p", "inner": {"size": 6}})
    assert from_dict(Outer, data).inner.size == 6
    section = async_training_config(OmegaConf.create({"async_training": {"max_queue_size": 9}}))
    assert section.max_queue_size == 9


def test_load_layers_files_data_and_overrides(tmp_path):
    first = tmp_path / "a.yaml"
    first.write_text("inner:\n  size: 2\n  name: from_a\nrequired_path: p\n")
    second = tmp_path / "b.yaml"
    second.write_text("inner:\n  size: 3\n")
    cfg = load(Outer, first, second, data={"inner": {"flag": True}}, overrides=["inner.size=11"])
    assert (cfg.inner.size, cfg.inner.name, cfg.inner.flag) == (11, "from_a", True)
    with pytest.raises(FileNotFoundError, match=r"missing\.yaml"):
        load(Outer, tmp_path / "missing.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        read_yaml(bad)


# -- the RL tree ------------------------------------------------------------------------------
def test_seed_keys_and_defaults():
    cfg = load_rl_config(overrides=REQUIRED)
    a = cfg.async_training
    assert (a.max_sync_retries, a.sync_timeout, a.sync_retry_delay) == (3, 30.0, 1.0)
    assert (a.sync_monitor_interval, a.staleness_threshold, a.generation_timeout) == (60.0, 3, 30.0)
    assert a.mode == "async" and a.max_queue_size >= 1
    assert cfg.data.train_files == ["a.jsonl"]
    assert cfg.actor_rollout_ref.model.path == "/models/tiny"
    for key in (
        "data.train_batch_size",
        "data.max_prompt_length",
        "data.max_response_length",
        "trainer.total_training_steps",
        "trainer.n_gpus_per_node",
        "trainer.trigger_parameter_sync_step",
        "rollout.n_gpus_per_node",
        "actor_rollout_ref.model.enable_gradient_checkpointing",
    ):
        assert key in config_keys(RLConfig)


def test_bundled_defaults_file_equals_the_dataclass_defaults():
    from_file = load_rl_config("fully_async_ppo", overrides=REQUIRED)
    from_code = from_dict(RLConfig, parse_overrides(REQUIRED))
    assert from_file == from_code
    # ... and it lists every key, so it documents the whole tree.
    raw = read_yaml(CONFIG_DIR / "fully_async_ppo.yaml")

    def leaves(d, prefix=""):
        for k, v in d.items():
            key = f"{prefix}.{k}" if prefix else k
            if isinstance(v, dict) and v:
                yield from leaves(v, key)
            else:
                yield key

    assert sorted(leaves(raw)) == sorted(config_keys(RLConfig))


def test_distillation_config_is_not_an_rl_config_and_says_where_it_belongs():
    assert "on_policy_distill_trainer" not in config_names()
    with pytest.raises(ValueError, match=r"python -m miniray\.rl\.distill\.main"):
        load_rl_config("on_policy_distill_trainer")


def test_seed_presets_and_command_line_overrides():
    assert {"fully_async_ppo", "e2e_minimal", "performance"} <= set(config_names())
    cfg = load_rl_config(
        "e2e_minimal",
        overrides=[
            *REQUIRED,
            "async_training.max_queue_size=500",
            "async_training.staleness_threshold=5",
            "actor_rollout_ref.actor.optim.lr=1e-5",
            "async_training.mode=sync",
        ],
    )
    assert (cfg.data.train_batch_size, cfg.trainer.total_training_steps) == (4, 2)
    assert (cfg.async_training.max_queue_size, cfg.async_training.staleness_threshold) == (500, 5)
    assert cfg.actor_rollout_ref.actor.optim.lr == 1e-5  # PyYAML reads 1e-5 as a string
    assert cfg.async_training.mode == "sync"
    perf = load_rl_config("performance", overrides=REQUIRED)
    assert (perf.data.train_batch_size, perf.async_training.max_queue_size) == (16, 1000)
    with pytest.raises(ValueError, match=r"config_name='nope' is unknown.*e2e_minimal"):
        load_rl_config("nope")


@pytest.mark.parametrize(
    ("override", "error", "pattern"),
    [
        (
            "async_training.max_queu_size=5",
            ValueError,
            "did you mean 'async_training.max_queue_size'",
        ),
        (
            "async_training.trigger_parameter_sync_step=4",
            ValueError,
            "did you mean 'trainer.trigger_parameter_sync_step'",
        ),
        ("async_training.staleness_threshold=0.1", TypeError, "must be an integer"),
        ("async_training.staleness_threshold=-1", ValueError, "must be >= 0"),
        ("async_training.mode=asynch", ValueError, "did you mean 'async'"),
        ("async_training.sync_timeout=soon", TypeError, "sync_timeout='soon'.*must be a number"),
        ("data.train_batch_size=0", ValueError, r"data\.train_batch_size=0 is invalid"),
        ("actor_rollout_ref.rollout.top_p=0", ValueError, "must be > 0"),
    ],
)
def test_bad_overrides_are_errors_naming_the_key(override, error, pattern):
    with pytest.raises(error, match=pattern):
        load_rl_config(overrides=[*REQUIRED, override])


def test_required_keys_of_the_rl_tree():
    with pytest.raises(ValueError, match=r"data\.train_files is required"):
        load_rl_config(overrides=REQUIRED[1:])
    with pytest.raises(ValueError, match=r"actor_rollout_ref\.model\.path is required"):
        load_rl_config(overrides=REQUIRED[:1])


def test_queue_must_hold_a_whole_batch():
    with pytest.raises(ValueError, match=r"max_queue_size=8 .*data\.train_batch_size=16"):
        load_rl_config(overrides=[*REQUIRED, "async_training.max_queue_size=8"])


def test_rl_config_from_plain_nested_dicts():
    cfg = RLConfig(
        data={"train_files": ["x.parquet"]},
        actor_rollout_ref={"model": {"path": "m"}, "rollout": {"n": 8}},
        async_training={"staleness_threshold": 0},
    )
    assert isinstance(cfg.data, DataConfig)
    assert cfg.actor_rollout_ref.rollout.n == 8 and cfg.async_training.staleness_threshold == 0


def test_async_training_section_from_any_config_form():
    full = load_rl_config(overrides=[*REQUIRED, "async_training.max_sync_retries=1"])
    assert async_training_config(full).max_sync_retries == 1
    assert async_training_config(full.async_training) is full.async_training
    assert async_training_config(None) == AsyncTrainingConfig()
    assert async_training_config({"async_training": {"sync_timeout": 2}}).sync_timeout == 2.0
    assert async_training_config({"sync_timeout": 2}).sync_timeout == 2.0
    assert async_training_config({"data": {"train_files": []}}) == AsyncTrainingConfig()
    with pytest.raises(ValueError, match=r"unknown config key 'async_training\.sync_timout'"):
        async_training_config({"sync_timout": 2})
    with pytest.raises(TypeError, match="must be an RLConfig"):
        async_training_config(42)


def test_command_line_words(tmp_path):
    cfg = parse_rl_args(["--config-name=e2e_minimal", *REQUIRED, "trainer.save_freq=5"])
    assert cfg.data.train_batch_size == 4 and cfg.trainer.save_freq == 5
    (tmp_path / "mine.yaml").write_text("trainer:\n  total_training_steps: 7\n")
    cfg = parse_rl_args(["--config-path", str(tmp_path), "--config-name", "mine", *REQUIRED])
    assert cfg.trainer.total_training_steps == 7
    with pytest.raises(ValueError, match="unknown option '--confg-name'"):
        parse_rl_args(["--confg-name=x"])
    with pytest.raises(ValueError, match="needs a value"):
        parse_rl_args(["--config-name"])


def test_describe_lists_every_key_with_default_and_help():
    text = describe(RLConfig)
    assert len(text.splitlines()) == len(config_keys(RLConfig))
    assert "async_training.staleness_threshold: int = 3  # k: a sample" in text
    assert "data.train_files: list[str] = (required)" in text


# -- non-finite floats ------------------------------------------------------------------------
# Keys that take inf, as "no limit". NaN is never a value: every comparison with it is false, so
# a NaN deadline would be "never" and a NaN learning rate would run until the loss is NaN.
INF_MEANS_NO_LIMIT = {"async_training.generation_timeout"}


def float_keys(cls, prefix=""):
    """Every dotted key whose type is float (or float | None), walking nested configs."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if isinstance(tp, type) and issubclass(tp, Config):
            yield from float_keys(tp, key)
        elif tp is float or float in typing.get_args(tp):
            yield key


def rl_tree(key, value):
    return load(
        RLConfig,
        data={"data": {"train_files": ["a.jsonl"]}},
        overrides=["actor_rollout_ref.model.path=/models/tiny", f"{key}={value}"],
    )


def distill_tree(key, value):
    from miniray.rl.distill.config import DistillConfig

    return load(
        DistillConfig,
        overrides=[
            "data.train_files=[a.jsonl]",
            "actor_rollout_ref.model.path=/m",
            f"{key}={value}",
        ],
    )


def non_finite_cases():
    from miniray.rl.distill.config import DistillConfig

    for tree, cls in ((rl_tree, RLConfig), (distill_tree, DistillConfig)):
        for key in float_keys(cls):
            for text in ("inf", "-inf", ".inf", "nan", ".nan"):
                yield pytest.param(tree, key, text, id=f"{cls.__name__}:{key}={text}")


def test_the_walk_finds_the_float_keys_of_both_trees():
    from miniray.rl.distill.config import DistillConfig

    rl, distill = set(float_keys(RLConfig)), set(float_keys(DistillConfig))
    assert {
        "actor_rollout_ref.actor.optim.lr",
        "async_training.weight_extrapolation",
        "async_training.generation_timeout",
        "actor_rollout_ref.actor.behaviour_weight_cap",  # float | None
    } <= rl
    assert {"distill.beta", "trainer.generation_timeout", "actor_rollout_ref.nccl_timeout"} <= (
        distill
    )
    assert rl >= INF_MEANS_NO_LIMIT


@pytest.mark.parametrize(("tree", "key", "text"), list(non_finite_cases()))
def test_every_float_key_refuses_nan_and_inf_unless_inf_means_no_limit(tree, key, text):
    positive_inf = text in ("inf", ".inf")
    if positive_inf and key in INF_MEANS_NO_LIMIT and tree is rl_tree:
        cfg = tree(key, text)
        section, _, name = key.rpartition(".")
        assert getattr(cfg[section], name) == float("inf")
        return
    rule = "not NaN" if "nan" in text else "must be finite"
    with pytest.raises(ValueError, match=rf"^{re.escape(key)}=.*is invalid: .*{rule}"):
        tree(key, text)


def test_python_floats_are_checked_as_overrides_are():
    with pytest.raises(ValueError, match=r"async_training\.weight_extrapolation=inf .*finite"):
        async_training_config({"weight_extrapolation": float("inf")})
    with pytest.raises(ValueError, match=r"async_training\.generation_timeout=nan .*not NaN"):
        async_training_config({"generation_timeout": float("nan")})
    assert AsyncTrainingConfig(generation_timeout=float("inf")).generation_timeout == float("inf")


def test_a_key_declares_that_it_takes_inf_and_the_help_says_so():
    @dataclass(kw_only=True)
    class Limits(Config):
        deadline: float = option(1.0, gt=0, allow_inf=True, help="seconds; inf: none")
        values: list[float] = option(default_factory=list)  # noqa: RUF009

    assert Limits.from_dict({"deadline": "inf"}).deadline == float("inf")
    with pytest.raises(ValueError, match=r"values\[1\]=inf is invalid: must be finite"):
        Limits.from_dict({"values": [1.0, "inf"]})
    with pytest.raises(ValueError, match=r"deadline=-inf is invalid"):
        Limits.from_dict({"deadline": "-inf"})
    assert "inf" in describe(AsyncTrainingConfig).split("generation_timeout")[1].splitlines()[0]
