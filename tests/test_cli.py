"""The CLI contract (DESIGN.md §4): commands, config printing, and the error behaviour (exit 2, one line)."""

import pytest
import yaml

from conftest import run_cli


def assert_one_line_usage_error(result, *fragments):
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ddpo: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("args, fragments", [
    (["run", "--algo", "ddpo-iss"], ["unknown algorithm 'ddpo-iss'", "Did you mean 'ddpo-is'?", "ddpo-is, ddpo-sf"]),
    (["run", "--reward", "compressability"], ["unknown reward 'compressability'", "Did you mean 'compressibility'?"]),
    (["run", "--epoch", "3"], ["No such option: --epoch", "--epochs"]),
    (["run", "--epochs", "three"], ["Invalid value for '--epochs'"]),
    (["run", "--set", "sample.eta=0"], ["sample.eta=0", "use sample.eta > 0"]),
    (["run", "--set", "sample.sde=dance-grpo"], ["sample.sde=dance-grpo is a flow-matching sampler", "(sd3, flux, wan)"]),
    (["run", "--config", "missing.yaml"], ["config file not found: missing.yaml"]),
    (["run", "--resume", "no/such/run"], ["no/such/run is not a run directory"]),
    (["run", "--device", "tpu"], ["invalid value for 'device'"]),
    (["list", "widgets"], ["unknown plugin kind 'widgets'", "valid: algorithms, rewards, models, prompts"]),
    (["sample", "--out", "grid.jpg"], ["--out must be a .png file"]),
    (["frobnicate"], ["No such command 'frobnicate'"]),
])
def test_user_errors_are_one_line_with_exit_code_2(args, fragments, tmp_path):
    assert_one_line_usage_error(run_cli(*args, cwd=tmp_path), *fragments)


def test_missing_weights_are_a_usage_error_and_leave_nothing_behind(forked_cli, tmp_path):
    result = forked_cli.run("run", "--model", "sd14", "--set", f"model.pretrained={tmp_path / 'nowhere'}",
                            "--logdir", str(tmp_path / "runs"))
    assert_one_line_usage_error(result, "cannot load model.pretrained=", "local directory saved with save_pretrained")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("role, sets", [
    ("reward", ["--reward", "clipscore", "--set", "reward.clip_model={nowhere}"]),
    ("eval.rewards", ["--set", "eval.rewards=[{{name: clipscore, clip_model: {nowhere}}}]"]),
])
def test_missing_reward_weights_are_a_usage_error_and_leave_nothing_behind(forked_cli, tmp_path, role, sets):
    nowhere = tmp_path / "no-clip"
    result = forked_cli.run("run", *[argument.format(nowhere=nowhere) for argument in sets],
                            "--logdir", str(tmp_path / "runs"))
    assert_one_line_usage_error(result, "cannot load the weights of reward 'clipscore'",
                                f"{role}.clip_model='{nowhere}'", "a local path that holds them")
    assert not (tmp_path / "runs").exists()


def test_debug_shows_the_traceback(tmp_path):
    result = run_cli("run", "--algo", "nope", env={"DDPO_DEBUG": "1"}, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" in result.stderr


def test_config_prints_the_resolved_yaml_with_plugin_defaults():
    result = run_cli("config", "--model", "sd14", "--set", "reward.quality=80", "--reward", "compressibility",
                     "--epochs", "5")
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    assert config["epochs"] == 5 and config["reward"] == {"name": "compressibility", "quality": 80}
    assert config["model"]["pretrained"] == "CompVis/stable-diffusion-v1-4" and config["model"]["lora_rank"] == 4
    assert config["algorithm"] == {"name": "ddpo-is", "clip_range": 0.0001, "kl_weight": 0.0}


def test_help_lists_the_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("run", "list", "config", "sample", "compare"):
        assert command in result.stdout
    run_help = run_cli("run", "--help")
    for flag in ("--algo", "--reward", "--model", "--config", "--set", "--epochs", "--seed", "--logdir",
                 "--run-name", "--resume", "--device"):
        assert flag in run_help.stdout
