"""The moving average of the trained weights (train.ema_decay, Flow-GRPO's EMA): its update against a float64
transcription of Flow-GRPO's, checkpoints that hold it beside the trained weights, an exact resume, and the
fixed evaluation set sampled with it."""

import pytest
import torch
from safetensors.torch import load_file

from ddpo.core.engine.ema import WeightAverage
from helpers import read_metrics


def flow_grpo_average(values, decay, every):
    """Flow-GRPO's EMAModuleWrapper (flow_grpo/ema.py:33-56) as scripts/train_sd3.py:954-955 calls it once per
    optimizer step with the steps taken so far, in float64: the average after each of `values[1:]`."""
    average, trail = values[0].double().clone(), []
    for steps, value in enumerate(values[1:], start=1):
        if (steps + 1) % every == 0:
            decay_now = min((1 + steps) / (10 + steps), decay)
            average = average + (1 - decay_now) * (value.double() - average)
        trail.append(average.clone())
    return trail


@pytest.mark.parametrize(("decay", "every"), [(0.9, 8), (0.5, 1), (0.99, 3)])
def test_the_average_follows_flow_grpos_update_and_warm_up(decay, every):
    values = list(torch.randn(100, 6, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    parameter = torch.nn.Parameter(values[0].clone())
    average = WeightAverage({"weight": parameter}, decay, every)
    for value, expected in zip(values[1:], flow_grpo_average(values, decay, every), strict=True):
        with torch.no_grad():
            parameter.copy_(value)  # an optimizer step
        average.after_optimizer_step()
        assert torch.allclose(average.average["weight"].double(), expected, rtol=1e-6, atol=1e-6)
    assert average.optimizer_steps == 99


def test_applied_puts_the_average_in_and_the_trained_weights_back_exactly():
    parameter = torch.nn.Parameter(torch.randn(4, 3, generator=torch.Generator().manual_seed(1)))
    average = WeightAverage({"weight": parameter}, 0.5, 1)
    trained = parameter.detach().clone()
    average.average["weight"] = torch.zeros(4, 3)
    with average.applied():
        assert torch.equal(parameter.detach(), torch.zeros(4, 3))
    assert torch.equal(parameter.detach(), trained)


def ema_run(cli, tmp_path, name, *args):
    result = cli.run("run", "--model", "ddpm", "--reward", "compressibility", "--set", "model.use_lora=true",
                     "--set", "sample.num_steps=3", "--set", "sample.batch_size=4",
                     "--set", "sample.batches_per_epoch=1",
                     "--set", "train.batch_size=2", "--set", "train.grad_accum=1", "--set", "train.learning_rate=1e-2",
                     "--set", "train.ema_decay=0.5", "--set", "train.ema_every=1", "--logdir", str(tmp_path),
                     "--run-name", name, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp_path / name


def test_checkpoints_hold_the_average_and_the_trained_weights_and_resume_exactly(tiny_ddpm, forked_cli, tmp_path):
    pretrained = ["--set", f"model.pretrained={tiny_ddpm}"]
    whole = ema_run(forked_cli, tmp_path, "whole", *pretrained, "--epochs", "3")
    part = ema_run(forked_cli, tmp_path, "part", *pretrained, "--epochs", "2")
    resumed = forked_cli.run("run", "--resume", str(part), "--epochs", "3")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for run_dir in (whole, part):
        checkpoint = run_dir / "checkpoints" / "epoch_0003"
        average, trained = (load_file(checkpoint / name) for name in ("weights.safetensors",
                                                                      "training_weights.safetensors"))
        assert average.keys() == trained.keys() and all("lora" in key for key in average)
        assert any(not torch.equal(average[key], trained[key]) for key in average)
    for name in ("weights.safetensors", "training_weights.safetensors"):
        first, second = (load_file(run_dir / "checkpoints" / "epoch_0003" / name) for run_dir in (whole, part))
        assert all(torch.equal(first[key], second[key]) for key in first), name
    assert [record["reward/mean"] for record in read_metrics(whole)] == \
        [record["reward/mean"] for record in read_metrics(part)]


def test_the_fixed_evaluation_set_is_sampled_with_the_average(tiny_ddpm, tmp_path):
    from test_algorithms import make_run

    from ddpo.core.engine.evaluation import evaluation_samples
    from ddpo.plugins.algorithms.ddpo import DDPOImportanceSampling
    from ddpo.plugins.prompts import Unconditional

    run, _ = make_run(tiny_ddpm, DDPOImportanceSampling(), tmp_path, batch_size=4, grad_accum=2)
    run.config.eval.num_steps, run.prompt_set = 4, Unconditional()
    parameters = dict(run.model.trainable_named_parameters())
    run.weight_average = WeightAverage(parameters, 0.5, 1)
    generator = torch.Generator().manual_seed(3)
    run.weight_average.average = {name: value + 0.05 * torch.randn(value.shape, generator=generator)
                                  for name, value in run.weight_average.average.items()}
    trained = {name: parameter.detach().clone() for name, parameter in parameters.items()}
    with_average, _, _ = evaluation_samples(run)
    assert all(torch.equal(parameters[name].detach(), trained[name]) for name in parameters)  # put back
    average, run.weight_average = run.weight_average, None
    without, _, _ = evaluation_samples(run)
    with average.applied():
        by_hand, _, _ = evaluation_samples(run)  # the model holding the average, no average kept
    assert torch.equal(with_average, by_hand) and not torch.equal(with_average, without)
