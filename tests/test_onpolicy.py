"""`train.gradient_from_sampling` (ddpo.core.engine.onpolicy): the on-policy samples' gradient taken while sampling is
each sample's own gradient, the runs it makes equal the ordinary ones, and what it cannot do is refused."""

import functools
import json

import pytest
import torch
from safetensors.torch import load_file

from ddpo.core.configuration.config import resolve_config
from ddpo.core.engine.onpolicy import SamplingGradients
from ddpo.core.engine.rollout import sample_batch
from ddpo.core.plugin_api.registry import get_registry

PROMPTS = ["a cat", "a dog", "a horse"]


def test_sampling_gives_each_samples_own_gradient_and_draws_the_same_samples(tiny_sd):
    """The oracle: each sample's log-probs recomputed alone, through peft's own LoRA layers, one step at a time,
    as the training pass would; guidance on, so a sample's two rows (unconditional, conditional) must add up."""
    model = get_registry().get("models", "sd14")({"pretrained": str(tiny_sd)})
    model.load(torch.device("cpu"), torch.float32)
    model.configure_training()
    with torch.no_grad():  # peft starts B at zero, which leaves A without gradient: give every matrix one
        for parameter in model.trainable_parameters():
            parameter.normal_(0, 0.05)
    model.denoiser.eval()
    gradients = SamplingGradients(model.unwrapped_denoiser(), model.name)
    settings = dict(num_steps=3, eta=1.0, guidance_scale=5.0)
    with gradients.batch(len(PROMPTS)):
        trajectory, _ = sample_batch(model, PROMPTS, [{}] * 3, generator=torch.Generator().manual_seed(0),
                                     gradients=gradients, **settings)
    sampled = gradients.take()
    plain, _ = sample_batch(model, PROMPTS, [{}] * 3, generator=torch.Generator().manual_seed(0), **settings)
    torch.testing.assert_close(trajectory.latents, plain.latents, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(trajectory.log_probs, plain.log_probs, rtol=1e-4, atol=1e-6)
    assert sampled.count == 3 and [tuple(g.shape[1:]) for g in sampled.per_sample] == [
        tuple(p.shape) for p in model.trainable_parameters()]
    assert all(type(module).__name__ != "PerSampleLinear" for module in model.denoiser.modules())  # swapped back

    for index in range(3):
        model.denoiser.zero_grad()
        alone = trajectory[index:index + 1]
        for step in range(alone.num_steps):
            if alone.policy_steps[0, step]:
                log_prob, *_ = model.step_log_prob(alone.transitions(torch.tensor([step])), 1.0, 5.0)
                log_prob.sum().backward()
        for parameter, per_sample in zip(sampled.parameters, sampled.per_sample, strict=True):
            norm = parameter.grad.norm().item()  # float32 sums in two orders: compared as whole vectors
            assert norm > 0
            assert (per_sample[index] - parameter.grad).norm().item() < 1e-4 * norm


def run_config(tmp_path, pipeline, name, algorithm, model="sd14", **overrides):
    """One epoch on the tiny SD pipeline whose only optimizer step covers all 4 samples. AdamW's epsilon of 1
    makes the step smooth in the gradient (at the default 1e-8 the first step is lr x sign(g), which rounding
    can flip for a near-zero entry), so equal gradients show as equal weights."""
    sets = ["sample.batch_size=2", "sample.batches_per_epoch=2", "sample.num_steps=3", "sample.guidance_scale=5",
            "train.batch_size=2", "train.grad_accum=2", "train.learning_rate=0.05", "train.adam_epsilon=1",
            "advantage.per_prompt_stat_tracking=false", f"model.pretrained={pipeline}", "eval.every=1000",
            *[f"{key}={value}" for key, value in overrides.items()]]
    return resolve_config(sets=sets, flags={"algorithm": {"name": algorithm}, "model": {"name": model},
                                            "reward": {"name": "compressibility"}, "epochs": 1, "device": "cpu",
                                            "logdir": str(tmp_path), "run_name": name})


@pytest.mark.parametrize("algorithm,model,compiled", [("ddpo-is", "sd14", False), ("ddpo-sf", "sd14", False),
                                                    ("ddpo-is", "sd14", True), ("ddpo-is", "sd3", False),
                                                    ("grpo", "sd3", False)])
def test_a_step_from_sampling_gradients_equals_the_ordinary_step(tmp_path, tiny_sd, tiny_sd3, algorithm, model,
                                                                   compiled, monkeypatch):
    """Same seed, same samples: the weights after the step and the logged loss and gradient norm agree, on SD's
    UNet and SD3's transformer (flow matching), and for GRPO (groups of 2: its advantages are group-relative).
    With `model.compile` (dynamo on its eager backend, as in test_performance) the swapped LoRA layers compile
    too."""
    from ddpo.core.engine.trainer import train

    pipeline = tiny_sd3 if model == "sd3" else tiny_sd
    if compiled:
        monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    compile_it = {"model.compile": "true"} if compiled else {}  # the swapped graph compiled, against plain eager
    groups = {"algorithm.group_size": 2} if algorithm == "grpo" else {}
    runs = {on: train(run_config(tmp_path, pipeline, f"{algorithm}-{on}", algorithm, model,
                                 **{"train.gradient_from_sampling": on, **groups,
                                    **(compile_it if on == "true" else {})}))
            for on in ("false", "true")}
    records = {on: json.loads((run / "metrics.jsonl").read_text().splitlines()[-1]) for on, run in runs.items()}
    assert records["true"]["train/optimizer_steps"] == records["false"]["train/optimizer_steps"] == 1
    for tag in ("loss/policy", "train/grad_norm", "policy/ratio_mean"):
        assert records["true"][tag] == pytest.approx(records["false"][tag], rel=1e-3, abs=1e-6), tag
    assert records["true"]["train/grad_norm"] > 0
    weights = {on: load_file(run / "checkpoints" / "epoch_0001" / "weights.safetensors") for on, run in runs.items()}
    assert weights["true"].keys() == weights["false"].keys()
    for name in weights["false"]:
        torch.testing.assert_close(weights["true"][name], weights["false"][name], rtol=1e-4, atol=1e-6)


def test_ddpo_is_trains_the_rest_of_the_epoch_after_the_sampled_step(tmp_path, tiny_sd):
    """Two inner epochs of two optimizer steps each: the first step comes from sampling, the other three from
    training passes, which leave the sampled samples out of the first inner epoch only."""
    from ddpo.core.engine.trainer import train

    config = run_config(tmp_path, tiny_sd, "rest", "ddpo-is", **{"train.gradient_from_sampling": "true",
                                                                 "train.grad_accum": 1, "train.inner_epochs": 2})
    record = json.loads((train(config) / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["train/optimizer_steps"] == 4
    assert record["policy/ratio_mean"] != 1.0  # the later steps are off-policy and were recomputed


@pytest.mark.parametrize("sets,message", [
    (["--algo", "rwr"], "algorithm 'rwr' with these options takes no gradient from sampling"),
    (["--set", "algorithm.kl_weight=0.1"], "algorithm 'ddpo-is' with these options takes no gradient"),
    (["--set", "train.batch_size=2", "--set", "train.grad_accum=1"], "must fill whole sampling batches"),
    (["--set", "train.timestep_fraction=0.5"], "set train.timestep_fraction=1"),
    (["--set", "model.sample_precision=bf16"], "set model.sample_precision=same"),
    (["--set", "model.use_lora=false"], "needs LoRA adapters"),
])
def test_what_sampling_gradients_cannot_do_is_a_one_line_usage_error(forked_cli, tmp_path, tiny_ddpm, sets,
                                                                      message):
    settings = [f"model.pretrained={tiny_ddpm}", "model.use_lora=true", "sample.batch_size=4",
                "sample.batches_per_epoch=1", "train.batch_size=4", "train.grad_accum=1", "sample.num_steps=2",
                "train.gradient_from_sampling=true"]
    result = forked_cli.run("run", "--model", "ddpm", "--reward", "compressibility",
                            *[argument for setting in settings for argument in ("--set", setting)],
                            "--epochs", "1", "--logdir", str(tmp_path), *sets)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not list(tmp_path.iterdir())  # nothing half-written
