import copy
import dataclasses
import math

import numpy as np
import pytest

from nemo_lossfree import LossFreeConfig


def test_defaults_are_the_grid_measured_quantile_rule():
    # docs/balancing.md: chosen over settings the default was not tuned on.
    cfg = LossFreeConfig()
    assert cfg.update_rule == "quantile"
    assert cfg.update_rate == 0.5
    assert cfg.center is True
    assert cfg.schedule == "constant"
    # The paper's rule stays one field away.
    assert LossFreeConfig(update_rule="sign", update_rate=1e-3).update_rate == 1e-3


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("update_rate", -1e-3, "lossfree.update_rate: must be a finite number >= 0, got -0.001"),
        ("update_rate", math.nan, "lossfree.update_rate: must be a finite number >= 0"),
        ("update_rate", math.inf, "lossfree.update_rate: must be a finite number >= 0"),
        ("update_rate", "fast", "lossfree.update_rate: must be a finite number >= 0"),
        ("update_rule", "linear", "lossfree.update_rule: must be one of quantile, sign, proportional"),
        ("schedule", "step", "lossfree.schedule: must be one of constant, inverse_time, cosine, linear_warmup"),
        ("warmup_steps", -1, "lossfree.warmup_steps: must be an integer >= 0"),
        ("decay_steps", 0, "lossfree.decay_steps: must be an integer >= 1"),
        ("freeze_after_steps", -5, "lossfree.freeze_after_steps: must be an integer >= 0 or null"),
        ("log_every", 0, "lossfree.log_every: must be an integer >= 1"),
        ("center", "yes please", "lossfree.center: must be true or false"),
        ("min_update_rate", 1.0, "lossfree.min_update_rate: must be <= lossfree.update_rate"),
        ("integral_gain", -0.1, "lossfree.integral_gain: must be a finite number >= 0, got -0.1"),
        ("integral_decay", 1.0, "lossfree.integral_decay: must be a number in [0, 1), got 1.0"),
        ("integral_decay", -0.5, "lossfree.integral_decay: must be a number in [0, 1), got -0.5"),
    ],
)
def test_invalid_values_name_the_field(field, value, message):
    with pytest.raises(ValueError) as err:
        LossFreeConfig(**{field: value})
    assert message in str(err.value)


def test_linear_warmup_needs_warmup_steps():
    with pytest.raises(ValueError, match="lossfree.warmup_steps: must be >= 1 when lossfree.schedule is linear_warmup"):
        LossFreeConfig(schedule="linear_warmup")


def test_from_dict_takes_typed_values_and_does_not_convert_text():
    """Text is typed where it is read (the run-config loader, argparse): LossFreeConfig only checks."""
    from nemo_lossfree.runconfig.load import typed_section

    section = typed_section("lossfree", {"update_rate": "1e-3", "center": "false", "freeze_after_steps": None,
                                         "warmup_steps": "10", "enabled": "true"}, "a test")
    cfg = LossFreeConfig.from_dict(section)
    assert cfg.update_rate == 1e-3 and cfg.center is False
    assert cfg.freeze_after_steps is None and cfg.warmup_steps == 10 and cfg.enabled is True
    assert LossFreeConfig.from_dict(None) == LossFreeConfig()
    with pytest.raises(ValueError, match=r"^lossfree.update_rate: must be a finite number >= 0, got '1e-3'$"):
        LossFreeConfig.from_dict({"update_rate": "1e-3"})
    with pytest.raises(ValueError, match=r"^lossfree.warmup_steps: must be an integer >= 0, got '10'$"):
        LossFreeConfig.from_dict({"warmup_steps": "10"})


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"lossfree.update_rat: unknown key; allowed keys are .*update_rate"):
        LossFreeConfig.from_dict({"update_rat": 1e-3})


def test_round_trip_through_dict():
    cfg = LossFreeConfig(update_rate=2e-3, update_rule="proportional", schedule="cosine", decay_steps=50)
    assert LossFreeConfig.from_dict(cfg.to_dict()) == cfg


def test_a_rule_without_a_rate_gets_its_own_rate():
    # A rate means something else per rule: quantile's 0.5 would be a huge sign step.
    assert LossFreeConfig(update_rule="sign").update_rate == 1e-3
    assert LossFreeConfig.from_dict({"update_rule": "proportional"}).update_rate == 1e-2
    assert LossFreeConfig.from_dict({"update_rule": "sign", "update_rate": None}).update_rate == 1e-3
    assert LossFreeConfig(update_rule="sign", update_rate=2e-3).update_rate == 2e-3
    config = LossFreeConfig(update_rule="sign")
    assert LossFreeConfig.from_dict(config.to_dict()) == config


def test_numpy_numbers_are_accepted_as_plain_python_numbers():
    # np.float32 was refused while np.float64 (a float subclass) passed.
    cfg = LossFreeConfig(update_rule="sign", update_rate=np.float32(1e-3), min_update_rate=np.float16(0),
                         integral_gain=np.float64(0.1), integral_decay=np.float32(0.5),
                         warmup_steps=np.int64(10), decay_steps=np.int32(50), freeze_after_steps=np.uint16(7),
                         log_every=np.int8(2))
    assert cfg.update_rate == float(np.float32(1e-3)) and cfg.warmup_steps == 10 and cfg.freeze_after_steps == 7
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        assert type(value) in (bool, str, int, float), (f.name, type(value))
    assert type(cfg.warmup_steps) is int and type(cfg.integral_gain) is float


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("update_rate", True, "lossfree.update_rate: must be a finite number >= 0, got True"),
        ("update_rate", np.bool_(True), "lossfree.update_rate: must be a finite number >= 0"),
        ("warmup_steps", np.float64(10), "lossfree.warmup_steps: must be an integer >= 0"),
        ("log_every", True, "lossfree.log_every: must be an integer >= 1, got True"),
    ],
)
def test_bools_and_floats_are_not_counts_or_rates(field, value, message):
    with pytest.raises(ValueError) as err:
        LossFreeConfig(**{field: value})
    assert message in str(err.value)


@pytest.mark.parametrize("field", ["center", "enabled"])
def test_string_booleans_read_the_same_for_every_bool_field(field):
    """The loader (OmegaConf's bool) reads every spelling alike for every bool field; LossFreeConfig takes bools."""
    from nemo_lossfree.runconfig.load import RunConfigError, load_run_config

    for text, value in [("true", True), ("false", False), ("yes", True), ("no", False), ("on", True),
                        ("off", False), ("1", True), ("0", False), ("TRUE", True), ("Off", False)]:
        section = load_run_config(None, [f"lossfree.{field}={text}"])["lossfree"]
        assert getattr(LossFreeConfig.from_dict(section), field) is value, text
    for text in ("maybe", "nope", "[1]"):
        with pytest.raises(RunConfigError, match=rf"^lossfree.{field}: "):
            load_run_config(None, [f"lossfree.{field}={text}"])
    for value in ("off", "", 2, None):
        with pytest.raises(ValueError, match=rf"^lossfree.{field}: must be true or false, got "):
            LossFreeConfig.from_dict({field: value})


def test_assignment_is_validated():
    # A validated config could be mutated into an invalid one.
    cfg = LossFreeConfig()
    with pytest.raises(ValueError, match=r"^lossfree.update_rate: must be a finite number >= 0, got -5$"):
        cfg.update_rate = -5
    with pytest.raises(ValueError, match=r"^lossfree.update_rate: must be in \[0, 1\] with update_rule quantile"):
        cfg.update_rate = 2.0
    with pytest.raises(ValueError, match=r"^lossfree.center: must be true or false"):
        cfg.center = "off"
    with pytest.raises(ValueError, match=r"^lossfree.min_update_rate: must be <= lossfree.update_rate"):
        cfg.min_update_rate = 0.9
    assert cfg == LossFreeConfig()  # a refused assignment changes nothing
    cfg.update_rate = np.float32(0.25)
    assert cfg.update_rate == 0.25 and type(cfg.update_rate) is float
    cfg.log_every = np.int64(5)
    assert type(cfg.log_every) is int
    cfg.update_rate = None  # the rule's own rate, as at construction
    assert cfg.update_rate == 0.5
    assert set(cfg.to_dict()) == {f.name for f in dataclasses.fields(cfg)}
    clone = copy.deepcopy(cfg)
    assert clone == cfg
    with pytest.raises(ValueError, match=r"^lossfree.warmup_steps: must be an integer >= 0"):
        clone.warmup_steps = -1
