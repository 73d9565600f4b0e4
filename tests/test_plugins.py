"""Plugin discovery through entry points: built-ins, a pip-installed third-party plugin, a broken plugin,
DDPO_LOAD_PLUGINS, and the lazy-import guarantee of `import ddpo` / `ddpo --help` / `ddpo list`."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ddpo.core.plugin_api.registry import get_registry
from ddpo.testing import check_prompt_set, check_reward
from conftest import run_cli
from helpers import make_distribution

EXAMPLE = Path(__file__).parent.parent / "examples" / "ddpo-reward-brightness"


@pytest.fixture(scope="module")
def installed_example(tmp_path_factory):
    """The example plugin pip-installed into its own directory (put it on PYTHONPATH to use it)."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(EXAMPLE)], check=True, capture_output=True, timeout=300)
    return target


@pytest.fixture(scope="module")
def broken_plugin(tmp_path_factory):
    """A distribution whose `ddpo` entry point fails to import."""
    return make_distribution(tmp_path_factory.mktemp("broken"), "broken_plugin",
                             "raise ImportError('needs a library that is not installed')\n")


def listing(env):
    result = run_cli("list", "--json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout), result.stderr


def test_builtins_are_registered_through_entry_points():
    registry = get_registry()
    assert {"ddpo-is", "ddpo-sf"} <= set(registry.names("algorithms"))
    assert {"compressibility", "incompressibility", "digit", "legibility"} <= set(registry.names("rewards"))
    assert {"sd14", "ddpm", "digits"} <= set(registry.names("models"))
    assert {"simple_animals", "animal_activities", "file", "unconditional"} <= set(registry.names("prompts"))
    info = registry.plugins["rewards"]["compressibility"].as_dict()
    assert info["package"] == "ddpo" and info["description"].startswith("Negative JPEG size")


def test_list_json_has_every_kind_and_field():
    data, _ = listing({})
    assert set(data) == {"algorithms", "rewards", "models", "prompts"}
    for items in data.values():
        for item in items:
            assert set(item) >= {"name", "package", "version", "description"}


def test_pip_installed_plugin_is_listed_and_can_be_excluded(installed_example):
    env = {"PYTHONPATH": str(installed_example)}
    data, _ = listing(env)
    brightness = next(item for item in data["rewards"] if item["name"] == "brightness")
    assert brightness["package"] == "ddpo-reward-brightness" and brightness["version"] == "0.1.0"
    assert brightness["description"] == "Mean pixel value, raised to `power`."
    excluded, _ = listing({**env, "DDPO_LOAD_PLUGINS": ""})
    assert "brightness" not in {item["name"] for item in excluded["rewards"]}
    assert "compressibility" in {item["name"] for item in excluded["rewards"]}  # built-ins always load
    chosen, _ = listing({**env, "DDPO_LOAD_PLUGINS": "brightness"})
    assert "brightness" in {item["name"] for item in chosen["rewards"]}


def test_pip_installed_plugin_trains_with_its_options(installed_example, tiny_ddpm, tmp_path):
    result = run_cli("run", "--reward", "brightness", "--model", "ddpm", "--set", f"model.pretrained={tiny_ddpm}",
                     "--set", "reward.power=2", "--set", "sample.num_steps=4", "--set", "sample.batch_size=4",
                     "--set", "sample.batches_per_epoch=1", "--set", "train.batch_size=4", "--set",
                     "train.grad_accum=1", "--epochs", "1", "--logdir", str(tmp_path), "--run-name", "bright",
                     env={"PYTHONPATH": str(installed_example)})
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "bright" / "metrics.jsonl").read_text().splitlines()[0])
    assert 0 < record["reward/mean"] < 1 and record["reward_queries"] == 4
    assert "power: 2.0" in (tmp_path / "bright" / "config.yaml").read_text()
    bad = run_cli("config", "--reward", "brightness", "--set", "reward.powr=2", env={"PYTHONPATH": str(installed_example)})
    assert bad.returncode == 2 and "unknown config key 'reward.powr'; valid keys here: name, power" in bad.stderr


def test_broken_plugin_is_reported_by_name_and_the_others_still_load(broken_plugin, installed_example):
    data, stderr = listing({"PYTHONPATH": f"{broken_plugin}:{installed_example}"})
    assert "plugin 'broken_plugin' failed to load: ImportError: needs a library that is not installed" in stderr
    names = {item["name"] for item in data["rewards"]}
    assert {"brightness", "compressibility"} <= names


def test_builtin_plugins_pass_the_shipped_contract_checks():
    registry = get_registry()
    rewards = check_reward(registry.get("rewards", "compressibility"))
    assert rewards.shape == (3,) and (rewards < 0).all()
    assert (check_reward(registry.get("rewards", "incompressibility")) > 0).all()
    prompts = check_prompt_set(registry.get("prompts", "animal_activities"))
    assert all(" " in prompt for prompt in prompts)


def test_contract_check_catches_a_reward_with_the_wrong_shape():
    import ddpo

    class Wrong(ddpo.Reward):
        name = "wrong"

        def __call__(self, images, prompts, metadata):
            return images.mean(dim=(2, 3))

    with pytest.raises(AssertionError, match=r"returned shape \(3, 3\) for a batch of 3"):
        check_reward(Wrong)


def test_importing_ddpo_and_listing_plugins_do_not_import_torch_or_the_server_stack():
    probe = textwrap.dedent("""
        import sys
        import ddpo
        from ddpo.cli import main
        for argv in (["--help"], ["list"], ["list", "--json"], ["config"]):
            try:
                main(argv)
            except SystemExit as exit:
                assert exit.code in (0, None), (argv, exit.code)
        heavy = sorted(name for name in ("torch", "diffusers", "transformers", "accelerate", "peft", "fastapi",
                                         "starlette", "uvicorn") if name in sys.modules)
        print("HEAVY", heavy)
    """)
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout


@pytest.mark.parametrize("contract, home", [("logprob", "math"), ("policy", "math"), ("hookspecs", "plugin_api"),
                                            ("schema", "plugin_api")])
def test_design_contract_module_paths_stay_importable(contract, home):
    """DESIGN.md names these module paths; the code moved into core's subpackages, so each path re-exports it."""
    import importlib

    shim = importlib.import_module(f"ddpo.core.{contract}")
    module = importlib.import_module(f"ddpo.core.{home}.{contract}")
    public = {name for name, value in vars(module).items()
              if not name.startswith("_") and getattr(value, "__module__", None) == module.__name__}
    assert public and all(getattr(shim, name) is getattr(module, name) for name in public)


def test_plugins_can_add_cli_commands(tmp_path):
    make_distribution(tmp_path, "hello_command", textwrap.dedent("""
        import ddpo, typer

        @ddpo.hookimpl
        def register_commands(app):
            @app.command()
            def hello(name: str = typer.Option("world", "--name")):
                \"\"\"Say hello.\"\"\"
                typer.echo(f"hello {name}")
    """))
    result = run_cli("hello", "--name", "ddpo", env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0 and result.stdout.strip() == "hello ddpo", result.stderr


def test_list_shows_each_plugins_options_with_their_help_text():
    data, _ = listing({})
    digit = next(item for item in data["rewards"] if item["name"] == "digit")
    assert digit["options"] == [{"name": "target", "type": "int", "default": "0", "help": "The digit to reward."}]
    sd = next(item for item in data["models"] if item["name"] == "sd14")
    assert {"pretrained", "use_lora", "lora_rank", "resolution"} <= {option["name"] for option in sd["options"]}
    text = run_cli("list", "rewards").stdout
    assert "target: int = 0  The digit to reward." in text
