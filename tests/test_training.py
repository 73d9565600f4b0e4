"""End-to-end runs of `ddpo run` on tiny pipelines: learning, the run directory, TensorBoard read back,
extending a finished run, LoRA export loadable by diffusers, and `ddpo sample`. (Exact resume after a crash,
for every algorithm, is in test_reliability.py.)"""


import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


# Small, fast settings for the tiny random SD pipeline. All weights are trained (its few attention layers give
# LoRA little leverage on the image) with a learning rate that moves them within a few epochs, and each epoch
# makes one optimizer step from all 32 samples: on a random network the policy gradient of a 16-sample
# minibatch is mostly noise, and PPO's later clipped steps then wander (clipping itself is tested on its own in
# test_algorithms.py). With these settings the reward rose for every seed tried.
TINY_SD = ["--model", "sd14", "--set", "sample.num_steps=4", "--set", "sample.batch_size=16",
           "--set", "sample.batches_per_epoch=2", "--set", "train.batch_size=16", "--set", "train.grad_accum=2",
           "--set", "model.use_lora=false", "--set", "train.learning_rate=1e-3"]
EPOCHS = 6
DESIGN_TAGS = ["reward/mean", "reward/std", "reward/min", "reward/max", "policy/approx_kl", "policy/clipfrac",
               "policy/ratio_mean", "loss/policy", "loss/total", "perf/epoch_seconds", "perf/samples_per_second",
               "perf/peak_memory_mb"]


def train(cli, logdir, name, *args, env=None):
    result = cli.run("run", "--logdir", str(logdir), "--run-name", name, *args, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return logdir / name


def is_args(tiny_sd):
    return ["--algo", "ddpo-is", "--reward", "compressibility", *TINY_SD, "--set", f"model.pretrained={tiny_sd}",
            "--epochs", str(EPOCHS), "--set", "eval.rewards=[incompressibility]"]


@pytest.fixture(scope="module")
def is_run(tiny_sd, forked_cli, tmp_path_factory):
    """ddpo-is on the tiny SD pipeline with the compressibility reward, incompressibility as eval reward."""
    return train(forked_cli, tmp_path_factory.mktemp("runs"), "is", *is_args(tiny_sd))


def assert_rising(rewards):
    """The last two epochs score clearly above the first: by 0.02 kB, about 10 standard errors of an epoch's
    mean (the rise was 0.04-0.06 kB for every seed tried)."""
    assert (rewards[-1] + rewards[-2]) / 2 > rewards[0] + 0.02, rewards


def test_ddpo_is_raises_compressibility(is_run):
    assert_rising([record["reward/mean"] for record in read_metrics(is_run)])


def test_ddpo_sf_raises_compressibility(tiny_sd, forked_cli, tmp_path):
    run_dir = train(forked_cli, tmp_path, "sf", "--algo", "ddpo-sf", "--reward", "compressibility", *TINY_SD,
                    "--set", f"model.pretrained={tiny_sd}", "--epochs", str(EPOCHS))
    records = read_metrics(run_dir)
    assert_rising([record["reward/mean"] for record in records])
    assert all(record["train/optimizer_steps"] == 1 for record in records)  # one step per round of sampling


def test_run_directory_has_the_contract_layout(is_run):
    records = read_metrics(is_run)
    assert [record["epoch"] for record in records] == list(range(1, EPOCHS + 1))
    assert [record["reward_queries"] for record in records] == [32 * epoch for epoch in range(1, EPOCHS + 1)]
    for record in records:
        for tag in DESIGN_TAGS + ["eval/incompressibility/mean"]:
            assert isinstance(record[tag], float), tag
        assert record["train/optimizer_steps"] == 1  # 32 samples / (train.batch_size 16 x grad_accum 2)
    assert len(list(is_run.glob("events.out.tfevents.*"))) == 1
    kept = sorted(path.name for path in (is_run / "checkpoints").iterdir())
    assert kept == [f"epoch_{epoch:04d}" for epoch in range(EPOCHS - 2, EPOCHS + 1)]  # keep_checkpoints: 3
    for name in kept:
        assert {path.name for path in (is_run / "checkpoints" / name).iterdir()} == {
            "weights.safetensors", "optimizer.pt", "algorithm.pt", "trainer.json"}
    assert sorted(path.name for path in (is_run / "samples").iterdir()) == [
        f"epoch_{epoch:04d}.png" for epoch in range(1, EPOCHS + 1)]
    config = yaml_config(is_run)
    assert config["run_name"] == "is" and config["model"]["use_lora"] is False and config["epochs"] == EPOCHS


def test_eval_reward_scores_the_same_images(is_run):
    for record in read_metrics(is_run):
        assert record["eval/incompressibility/mean"] == pytest.approx(-record["reward/mean"], abs=1e-5)


def test_tensorboard_event_file_reads_back_with_reward_queries_as_step(is_run):
    events = EventAccumulator(str(is_run), size_guidance={"scalars": 0, "images": 0, "histograms": 0, "tensors": 0})
    events.Reload()
    records = read_metrics(is_run)
    scalars = events.Scalars("reward/mean")
    steps = [32 * epoch for epoch in range(1, EPOCHS + 1)]
    assert [event.step for event in scalars] == steps
    assert [event.value for event in scalars] == pytest.approx([record["reward/mean"] for record in records])
    tags = events.Tags()
    assert set(DESIGN_TAGS) <= set(tags["scalars"])
    assert [event.step for event in events.Images("samples")] == steps
    assert "reward/distribution" in tags["histograms"]
    assert events.PluginTagToContent("hparams")  # the config as hparams, in the same event stream


def test_resume_can_extend_a_finished_run(is_run, forked_cli, tmp_path):
    import shutil

    run_dir = tmp_path / "extended"
    shutil.copytree(is_run, run_dir)
    result = forked_cli.run("run", "--resume", str(run_dir), "--epochs", str(EPOCHS + 1))
    assert result.returncode == 0, result.stderr[-3000:]
    assert [record["epoch"] for record in read_metrics(run_dir)] == list(range(1, EPOCHS + 2))
    assert sorted(path.name for path in (run_dir / "checkpoints").iterdir()) == [
        f"epoch_{epoch:04d}" for epoch in range(EPOCHS - 1, EPOCHS + 2)]
    assert yaml_config(run_dir)["epochs"] == EPOCHS + 1


def test_lora_checkpoint_loads_in_vanilla_diffusers(tiny_sd, forked_cli, tmp_path):
    from diffusers import StableDiffusionPipeline

    from ddpo.plugins.models.sd import StableDiffusion

    run_dir = train(forked_cli, tmp_path, "lora", "--algo", "ddpo-is", "--reward", "compressibility", *TINY_SD,
                    "--set", f"model.pretrained={tiny_sd}", "--set", "model.use_lora=true",
                    "--set", "train.learning_rate=3e-4", "--epochs", "1")
    checkpoint = run_dir / "checkpoints" / "epoch_0001"
    assert (checkpoint / "lora" / "pytorch_lora_weights.safetensors").is_file()

    ours = StableDiffusion({"pretrained": str(tiny_sd)})
    ours.load(torch.device("cpu"), torch.float32)
    ours.configure_training()
    ours.load_weights(checkpoint)
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd)
    generator = torch.Generator().manual_seed(0)
    sample, embeds = torch.randn(2, 4, 16, 16, generator=generator), torch.randn(2, 16, 32, generator=generator)
    timesteps = torch.tensor([500, 20])
    with torch.no_grad():
        base = pipeline.unet(sample, timesteps, encoder_hidden_states=embeds).sample
        pipeline.load_lora_weights(checkpoint / "lora")
        loaded = pipeline.unet(sample, timesteps, encoder_hidden_states=embeds).sample
        trained = ours.denoiser(sample, timesteps, encoder_hidden_states=embeds).sample
    assert not torch.allclose(base, trained, atol=1e-6)  # training changed the adapters
    assert torch.allclose(loaded, trained, atol=1e-5)


def test_sample_command_writes_grids_of_the_base_and_fine_tuned_model(is_run, forked_cli, tmp_path):
    from PIL import Image

    checkpoint = is_run / "checkpoints" / f"epoch_{EPOCHS:04d}"
    tuned = forked_cli.run("sample", "--checkpoint", str(checkpoint), "--num", "6", "--prompt", "cat", "--prompt",
                           "dog", "--out", str(tmp_path / "tuned.png"))
    assert tuned.returncode == 0, tuned.stderr[-2000:]
    base_config = yaml_config(is_run)
    base = forked_cli.run("sample", "--model", "sd14", "--set",
                          f"model.pretrained={base_config['model']['pretrained']}", "--set", "sample.num_steps=4",
                          "--num", "6", "--prompt", "cat", "--prompt", "dog", "--out", str(tmp_path / "base.png"))
    assert base.returncode == 0, base.stderr[-2000:]
    tuned_image, base_image = Image.open(tmp_path / "tuned.png"), Image.open(tmp_path / "base.png")
    assert tuned_image.size == base_image.size == (3 * 66 + 2, 2 * 66 + 2)  # 3x2 grid of 64-pixel cells
    assert tuned_image.tobytes() != base_image.tobytes()


def yaml_config(run_dir):
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())


def test_compare_tabulates_and_plots_runs_on_the_reward_query_axis(is_run, forked_cli, tmp_path):
    from PIL import Image

    chart = tmp_path / "chart.png"
    result = forked_cli.run("compare", str(is_run.parent), "--tag", "reward/mean", "--out", str(chart))
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if line.startswith("ddpo-is "))
    last = read_metrics(is_run)[-1]
    assert row.split()[:5] == ["ddpo-is", "compressibility", "sd14", "1", str(last["reward_queries"])]
    assert f"{last['reward/mean']:.3g} ± 0" in row  # one seed: std 0
    assert Image.open(chart).format == "PNG"
    missing = forked_cli.run("compare", str(is_run.parent), "--tag", "reward/meen")
    assert missing.returncode == 2 and "tags there:" in missing.stderr and "reward/mean" in missing.stderr
from helpers import read_metrics
