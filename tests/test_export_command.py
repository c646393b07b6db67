"""``nemo-lossfree export``: bad input is one line naming the flag, before Megatron-Bridge is needed.

The project venv has no Megatron-Bridge (an optional extra), so a valid
command line here ends with the one line saying what to install. The export
itself (a Bridge checkpoint on disk -> transformers, same experts per token)
runs in the Bridge lane: tests/_support/bridge_lane/lane_checks.py.
"""

from __future__ import annotations

import functools

import pytest
import yaml

from nemo_lossfree.apps.cli import main
from nemo_lossfree.exit_codes import EXIT_USAGE
from nemo_lossfree.integrations.export_checkpoint import (
    LOSSFREE_SPEC_TARGET,
    RUN_CONFIG,
    check_recorded_layer_spec,
    iteration_dir,
    loadable_model_section,
)


@pytest.fixture
def bridge_checkpoint(tmp_path):
    """The layout a Bridge run's checkpoint.save folder has: iter_* folders with run_config.yaml."""
    root = tmp_path / "ckpt"
    for iteration in (2, 10):
        folder = root / f"iter_{iteration:07d}"
        folder.mkdir(parents=True)
        (folder / RUN_CONFIG).write_text("model: {}\n")
    (root / "latest_checkpointed_iteration.txt").write_text("10")
    return root


@pytest.fixture
def hf_model(tmp_path):
    folder = tmp_path / "hf-config"
    folder.mkdir()
    (folder / "config.json").write_text('{"architectures": ["DeepseekV3ForCausalLM"]}')
    return folder


def _export(capsys, *args):
    code = main(["export", *map(str, args)])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def test_newest_iteration_is_taken(bridge_checkpoint):
    assert iteration_dir(bridge_checkpoint).name == "iter_0000010"  # 10 > 2, not by name order
    assert iteration_dir(bridge_checkpoint / "iter_0000002").name == "iter_0000002"


@pytest.mark.parametrize("case, expected", [
    ("missing", "CHECKPOINT_DIR: {ckpt} is not a directory"),
    ("empty", "CHECKPOINT_DIR: {ckpt} has no run_config.yaml and no iter_* folder"),
    ("megatron_lm", "CHECKPOINT_DIR: {ckpt}/iter_0000004 is a Megatron-LM checkpoint (no run_config.yaml)"),
])
def test_bad_checkpoint_dir_is_one_line(case, expected, tmp_path, hf_model, capsys):
    ckpt = tmp_path / "ckpt"
    if case == "empty":
        ckpt.mkdir()
    elif case == "megatron_lm":
        (ckpt / "iter_0000004").mkdir(parents=True)
        (ckpt / "iter_0000004" / "common.pt").write_bytes(b"")
    code, err = _export(capsys, ckpt, "--hf-model", hf_model, "--hf-path", tmp_path / "out")
    assert code == EXIT_USAGE
    assert len(err) == 1 and err[0].startswith("nemo-lossfree export: " + expected.format(ckpt=ckpt)), err


def test_hf_model_folder_without_config_is_one_line(bridge_checkpoint, tmp_path, capsys):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    code, err = _export(capsys, bridge_checkpoint, "--hf-model", folder, "--hf-path", tmp_path / "out")
    assert code == EXIT_USAGE
    assert err == [f"nemo-lossfree export: --hf-model: {folder} has no config.json "
                   "(a Hugging Face model folder has one)"]


def test_hf_model_that_is_no_folder_and_no_hub_id_is_one_line(bridge_checkpoint, tmp_path, capsys):
    missing = tmp_path / "typo"
    code, err = _export(capsys, bridge_checkpoint, "--hf-model", missing, "--hf-path", tmp_path / "out")
    assert code == EXIT_USAGE
    assert err == [f"nemo-lossfree export: --hf-model: {missing} is neither a local folder nor a Hub id "
                   "such as org/name"]


def test_unwritable_hf_path_is_one_line(bridge_checkpoint, hf_model, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, err = _export(capsys, bridge_checkpoint, "--hf-model", hf_model, "--hf-path", blocker / "out")
    assert code == EXIT_USAGE
    assert len(err) == 1 and err[0].startswith("nemo-lossfree export: --hf-path: cannot create or write"), err
    assert not (blocker.parent / "out").exists()


def test_malformed_layer_spec_is_one_line(bridge_checkpoint, hf_model, tmp_path, capsys):
    code, err = _export(capsys, bridge_checkpoint, "--hf-model", hf_model, "--hf-path", tmp_path / "out",
                        "--layer-spec", "not a path")
    assert code == EXIT_USAGE
    assert err == ["nemo-lossfree export: --layer-spec: expected module:function or module.function, "
                   "got 'not a path'"]


def test_missing_hf_model_flag_is_named(bridge_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(bridge_checkpoint), "--hf-path", str(tmp_path / "out")])
    assert exit_info.value.code == EXIT_USAGE
    assert "the following arguments are required: --hf-model" in capsys.readouterr().err


@pytest.mark.parametrize("hub_id", ["deepseek-ai/DeepSeek-V3", "zai-org/GLM-4.5"])
def test_without_megatron_bridge_says_what_to_install(bridge_checkpoint, hub_id, tmp_path, capsys):
    """Valid input; this venv has no megatron.bridge: one line, nothing written."""
    out = tmp_path / "out"
    code, err = _export(capsys, bridge_checkpoint, "--hf-model", hub_id, "--out", out)
    assert code == EXIT_USAGE
    assert len(err) == 1, err
    assert err[0].startswith("nemo-lossfree export: megatron.bridge: not installed")
    assert "pip install 'nemo-lossfree[bridge]'" in err[0]
    assert not out.exists()


# --- the run config Bridge's loader is given ---------------------------------------

RECORDED = {"_target_": LOSSFREE_SPEC_TARGET,
            "inner": {"_target_": "megatron.bridge.models.gpt_provider.local_layer_spec", "_call_": False}}
OLD_STYLE = {"_target_": LOSSFREE_SPEC_TARGET, "_call_": True}  # written before to_cfg_dict
WRAPPER = {"_target_": "functools.LossFreeBalancer.attach.<locals>.finalize_model_grads_with_lossfree",
           "_call_": False}


def test_the_balancers_finalize_wrapper_is_dropped_and_a_recorded_spec_kept():
    section = {"finalize_model_grads_func": WRAPPER, "transformer_layer_spec": RECORDED, "num_layers": 2}
    loadable = loadable_model_section(section)
    assert loadable == {"finalize_model_grads_func": None, "transformer_layer_spec": RECORDED, "num_layers": 2}
    assert section["finalize_model_grads_func"] is WRAPPER  # the input is left as it is


def test_layer_spec_flag_replaces_the_inner_spec_and_keeps_ours():
    loadable = loadable_model_section({"transformer_layer_spec": OLD_STYLE}, "my_pkg.specs:cpu_spec")
    assert loadable["transformer_layer_spec"] == {
        "_target_": LOSSFREE_SPEC_TARGET, "inner": {"_target_": "my_pkg.specs.cpu_spec", "_call_": False}}


def test_upstream_spec_is_replaced_unwrapped():
    """A model trained with Megatron's own expert bias (TopKRouter) keeps TopKRouter."""
    upstream = {"_target_": "megatron.bridge.models.gpt_provider.default_layer_spec", "_call_": False}
    loadable = loadable_model_section({"transformer_layer_spec": upstream}, "my_pkg.specs.cpu_spec")
    assert loadable["transformer_layer_spec"] == {"_target_": "my_pkg.specs.cpu_spec", "_call_": False}


def test_old_style_checkpoint_without_layer_spec_flag_names_the_flag():
    with pytest.raises(ValueError, match=r"^--layer-spec: required for this checkpoint"):
        loadable_model_section({"transformer_layer_spec": OLD_STYLE})


@pytest.mark.parametrize("target, expected", [
    ("my_pkg.specs.cpu_spec", "--layer-spec: the checkpoint's layer spec my_pkg.specs.cpu_spec is outside "
                              "Megatron-Bridge's allowlist of importable targets; pass --layer-spec "
                              "my_pkg.specs.cpu_spec to load it (code you trust)"),
    ("cpu_mla.with_cpu_mla.<locals>.spec", "--layer-spec: the checkpoint's layer spec "
                                           "cpu_mla.with_cpu_mla.<locals>.spec was defined inside a function"),
])
def test_recorded_spec_bridge_would_not_import_names_the_flag(target, expected):
    section = {"transformer_layer_spec": {"_target_": LOSSFREE_SPEC_TARGET,
                                          "inner": {"_target_": target, "_call_": False}}}
    with pytest.raises(ValueError) as refused:
        check_recorded_layer_spec(section)
    assert str(refused.value).startswith(expected)
    # megatron.core is on every allowlist (Bridge adds megatron., nemo., ... when it is imported).
    upstream_spec = "megatron.core.models.gpt.gpt_layer_specs.get_gpt_decoder_block_spec"
    check_recorded_layer_spec({"transformer_layer_spec": {
        "_target_": LOSSFREE_SPEC_TARGET, "inner": {"_target_": upstream_spec, "_call_": False}}})


def _decoder_spec(config, vp_stage=None):
    return ("spec for", config, vp_stage)


def test_lossfree_layer_spec_records_the_spec_it_wraps(monkeypatch):
    """Bridge writes the provider with megatron.training's representers and rebuilds it with
    its instantiate(): LossFreeLayerSpec comes back around the same spec (also a partial)."""
    from megatron.training.config.instantiate_utils import instantiate, target_allowlist
    from megatron.training.config.yaml_utils import safe_yaml_representers

    from nemo_lossfree.integrations.bridge import LossFreeLayerSpec

    monkeypatch.setattr(target_allowlist, "_allowed_prefixes", [*target_allowlist.allowed_prefixes,
                                                                 "nemo_lossfree.", _decoder_spec.__module__ + "."])
    for inner in (_decoder_spec, functools.partial(_decoder_spec, vp_stage=3)):
        with safe_yaml_representers():
            text = yaml.safe_dump({"transformer_layer_spec": LossFreeLayerSpec(inner).to_cfg_dict()})
        rebuilt = instantiate(yaml.safe_load(text)["transformer_layer_spec"])
        assert type(rebuilt) is LossFreeLayerSpec
        assert rebuilt.inner("cfg") == inner("cfg")


def test_bad_flags_are_answered_before_torch_is_imported(tmp_path):
    """The one line comes in a second: neither Megatron-Bridge nor torch is imported for it."""
    import subprocess
    import sys

    probe = ("import sys\nfrom nemo_lossfree.apps.cli import main\n"
             f"code = main(['export', {str(tmp_path / 'missing')!r}, '--hf-model', 'org/name', "
             f"'--hf-path', {str(tmp_path / 'out')!r}])\n"
             "print(code, sorted(m for m in ('torch', 'megatron') if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.stdout.split("\n")[0] == f"{EXIT_USAGE} []", result.stdout + result.stderr
    assert result.stderr.strip().startswith("nemo-lossfree export: CHECKPOINT_DIR:")
