import math

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


def test_from_dict_reads_yaml_and_command_line_strings():
    cfg = LossFreeConfig.from_dict(
        {"update_rate": "1e-3", "center": "false", "freeze_after_steps": "null", "warmup_steps": "10",
         "enabled": "true"}
    )
    assert cfg.update_rate == 1e-3 and cfg.center is False
    assert cfg.freeze_after_steps is None and cfg.warmup_steps == 10 and cfg.enabled is True
    assert LossFreeConfig.from_dict(None) == LossFreeConfig()


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
    assert LossFreeConfig.from_dict({"update_rule": "sign", "update_rate": "null"}).update_rate == 1e-3
    assert LossFreeConfig(update_rule="sign", update_rate=2e-3).update_rate == 2e-3
    config = LossFreeConfig(update_rule="sign")
    assert LossFreeConfig.from_dict(config.to_dict()) == config
