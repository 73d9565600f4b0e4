"""Config layering, validation and error messages (DESIGN.md §4-5)."""

import pytest

from ddpo.core.configuration.config import RunConfig, merge, parse_set, resolve_config
from ddpo.core.configuration.errors import UsageError


def test_defaults_are_the_embedded_demo_and_every_field_is_documented():
    config = resolve_config()
    assert (config.algorithm.name, config.reward.name, config.model.name) == ("ddpo-is", "digit", "digits")
    assert config.prompts.name == "unconditional"  # the digits model is unconditional
    sections = [RunConfig, *(RunConfig.model_fields[name].annotation for name in ("sample", "train", "advantage",
                                                                                  "eval"))]
    for section in sections:
        for name, field in section.model_fields.items():
            if name not in ("sample", "train", "advantage", "eval"):
                assert field.description, f"{section.__name__}.{name} has no docstring"


def test_precedence_defaults_model_file_set_flags(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("epochs: 7\nsample:\n  num_steps: 12\n  eta: 0.5\ntrain:\n  learning_rate: 0.002\n")
    config = resolve_config(yaml_file, ["sample.num_steps=13", "epochs=8"], {"epochs": 9})
    assert config.epochs == 9  # flag beats --set beats file
    assert config.sample.num_steps == 13  # --set beats file
    assert config.sample.eta == 0.5 and config.train.learning_rate == 0.002  # file beats model defaults
    assert config.sample.batch_size == 32  # the digits model's default beats the built-in 8
    assert RunConfig().sample.batch_size == 8


def test_toml_files_and_typed_set_values(tmp_path):
    toml_file = tmp_path / "run.toml"
    toml_file.write_text('seed = 3\n[reward]\nname = "digit"\ntarget = 7\n')
    config = resolve_config(toml_file, ["train.learning_rate=1e-4", "advantage.per_prompt_stat_tracking=true",
                                        "eval.rewards=[legibility, compressibility]", "run_name=123"])
    assert config.seed == 3 and config.reward.options() == {"target": 7}
    assert config.train.learning_rate == pytest.approx(1e-4)
    assert config.advantage.per_prompt_stat_tracking is True
    assert config.eval.rewards == ["legibility", "compressibility"] and config.run_name == "123"


def test_algorithm_and_model_run_defaults_layer_under_the_user():
    config = resolve_config(flags={"model": {"name": "sd14"}})
    assert config.model.options()["pretrained"] == "CompVis/stable-diffusion-v1-4"
    assert config.prompts.name == "simple_animals" and config.sample.guidance_scale == 5.0
    ddpm = resolve_config(None, ["prompts.name=simple_animals"], {"model": {"name": "ddpm"}})
    assert ddpm.prompts.name == "simple_animals" and ddpm.sample.guidance_scale == 1.0


def test_naming_another_plugin_drops_the_options_of_the_one_below(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("reward:\n  name: digit\n  target: 3\n")
    config = resolve_config(yaml_file, [], {"reward": {"name": "compressibility"}})
    assert config.reward.name == "compressibility" and config.reward.options() == {"quality": 95}
    kept = resolve_config(yaml_file, ["reward.target=5"])
    assert kept.reward.options() == {"target": 5}


@pytest.mark.parametrize("sets, message", [
    (["sample.num_stepz=3"], "unknown config key 'sample.num_stepz'; valid keys here: batch_size, batches_per_epoch"),
    (["epochz=3"], "unknown config key 'epochz'; valid keys here: advantage, algorithm"),
    (["sample.eta=-1"], "invalid value for 'sample.eta': Input should be greater than or equal to 0"),
    (["reward.target=12"], "invalid value for 'reward.target'"),
    (["reward.power=2"], "unknown config key 'reward.power'; valid keys here: name, target"),
    (["mixed_precision=fp8"], "invalid value for 'mixed_precision'"),
    (["sample.eta=0"], "sample.eta=0 makes DDIM sampling deterministic, so algorithm 'ddpo-is'"),
    (["train.batch_size=5"], "must be a multiple of train.batch_size x train.grad_accum = 5"),
    (["eval.rewards=[aesthetik]"], "unknown reward 'aesthetik'"),
    (["sample.eta"], "--set expects KEY=VALUE"),
    (["sample.sde=cps"], "sample.sde=cps is a flow-matching sampler, but model"),
    (["sample.sde=ode"], "invalid value for 'sample.sde'"),
])
def test_bad_values_give_one_line_naming_the_key_and_what_is_valid(sets, message):
    with pytest.raises(UsageError) as caught:
        resolve_config(None, sets)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_flow_models_take_every_sample_sde():
    for sde in ("flow-grpo", "dance-grpo", "cps"):
        assert resolve_config(None, [f"sample.sde={sde}"], {"model": {"name": "sd3"}}).sample.sde == sde
    assert resolve_config(None, ["sample.sde=flow-grpo"]).sample.sde == "flow-grpo"  # the default, on DDIM too


def test_unknown_plugin_names_suggest_the_closest():
    with pytest.raises(UsageError, match=r"unknown algorithm 'ddpo-iss'. Did you mean 'ddpo-is'\? Valid: (\S+, )*ddpo-is, ddpo-sf"):
        resolve_config(flags={"algorithm": {"name": "ddpo-iss"}})


def test_config_file_errors(tmp_path):
    with pytest.raises(UsageError, match="config file not found"):
        resolve_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1\n")
    with pytest.raises(UsageError, match="cannot parse config file"):
        resolve_config(bad)
    wrong = tmp_path / "run.json"
    wrong.write_text("{}")
    with pytest.raises(UsageError, match=r"must end in .yaml, .yml or .toml"):
        resolve_config(wrong)


def test_merge_and_parse_set_helpers():
    assert parse_set("a.b.c=1") == {"a": {"b": {"c": 1}}}
    assert parse_set("name=") == {"name": ""}
    assert merge({"sample": {"eta": 1.0, "num_steps": 5}}, {"sample": {"eta": 0.5}}) == \
        {"sample": {"eta": 0.5, "num_steps": 5}}
