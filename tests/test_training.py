"""End-to-end runs of `ddpo run` on tiny pipelines: learning, the run directory, TensorBoard read back,
resume after a crash, LoRA export loadable by diffusers, and `ddpo sample`."""

import json

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import run_cli

# Small, fast settings for the tiny random SD pipeline; all weights are trained (its few attention layers
# give LoRA little leverage on the image) with a learning rate that moves them within a few epochs.
TINY_SD = ["--model", "sd14", "--set", "sample.num_steps=4", "--set", "sample.batch_size=8",
           "--set", "sample.batches_per_epoch=4", "--set", "train.batch_size=8", "--set", "train.grad_accum=1"]
FULL_FINETUNE = ["--set", "model.use_lora=false", "--set", "train.learning_rate=1e-3"]
DESIGN_TAGS = ["reward/mean", "reward/std", "reward/min", "reward/max", "policy/approx_kl", "policy/clipfrac",
               "policy/ratio_mean", "loss/policy", "loss/total", "perf/epoch_seconds", "perf/samples_per_second",
               "perf/peak_memory_mb"]


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train(logdir, name, *args, env=None):
    result = run_cli("run", "--logdir", str(logdir), "--run-name", name, *args, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return logdir / name


@pytest.fixture(scope="module")
def is_run(tiny_sd, tmp_path_factory):
    """ddpo-is on the tiny SD pipeline, compressibility, 3 epochs, with incompressibility as eval reward."""
    return train(tmp_path_factory.mktemp("runs"), "is", "--algo", "ddpo-is", "--reward", "compressibility", *TINY_SD,
                 "--set", f"model.pretrained={tiny_sd}", *FULL_FINETUNE, "--epochs", "3",
                 "--set", "eval.rewards=[incompressibility]")


def assert_rising(rewards):
    """The later epochs score clearly above the first (about 10x the standard error of an epoch's mean)."""
    assert rewards[-1] > rewards[0] + 0.01 and sum(rewards[1:]) / len(rewards[1:]) > rewards[0] + 0.005, rewards


def test_ddpo_is_raises_compressibility(is_run):
    assert_rising([record["reward/mean"] for record in read_metrics(is_run)])


def test_ddpo_sf_raises_compressibility(tiny_sd, tmp_path):
    run_dir = train(tmp_path, "sf", "--algo", "ddpo-sf", "--reward", "compressibility", *TINY_SD,
                    "--set", f"model.pretrained={tiny_sd}", "--set", "model.use_lora=false",
                    "--set", "train.learning_rate=3e-3", "--epochs", "3")
    records = read_metrics(run_dir)
    assert_rising([record["reward/mean"] for record in records])
    assert all(record["train/optimizer_steps"] == 1 for record in records)  # one step per round of sampling


def test_run_directory_has_the_contract_layout(is_run):
    records = read_metrics(is_run)
    assert [record["epoch"] for record in records] == [1, 2, 3]
    assert [record["reward_queries"] for record in records] == [32, 64, 96]
    for record in records:
        for tag in DESIGN_TAGS + ["eval/incompressibility/mean"]:
            assert isinstance(record[tag], float), tag
    assert records[0]["train/optimizer_steps"] == 4  # 32 samples / (train.batch_size 8 x grad_accum 1)
    assert len(list(is_run.glob("events.out.tfevents.*"))) == 1
    for epoch in (1, 2, 3):
        checkpoint = is_run / "checkpoints" / f"epoch_{epoch:04d}"
        assert {path.name for path in checkpoint.iterdir()} == {"weights.safetensors", "optimizer.pt",
                                                                "algorithm.pt", "trainer.json"}
        assert (is_run / "samples" / f"epoch_{epoch:04d}.png").is_file()
    config_text = (is_run / "config.yaml").read_text()
    assert "run_name: is" in config_text and "use_lora: false" in config_text


def test_eval_reward_scores_the_same_images(is_run):
    for record in read_metrics(is_run):
        assert record["eval/incompressibility/mean"] == pytest.approx(-record["reward/mean"], abs=1e-5)


def test_tensorboard_event_file_reads_back_with_reward_queries_as_step(is_run):
    events = EventAccumulator(str(is_run), size_guidance={"scalars": 0, "images": 0, "histograms": 0, "tensors": 0})
    events.Reload()
    records = read_metrics(is_run)
    scalars = events.Scalars("reward/mean")
    assert [event.step for event in scalars] == [32, 64, 96]
    assert [event.value for event in scalars] == pytest.approx([record["reward/mean"] for record in records])
    tags = events.Tags()
    assert set(DESIGN_TAGS) <= set(tags["scalars"])
    assert [event.step for event in events.Images("samples")] == [32, 64, 96]
    assert "reward/distribution" in tags["histograms"]
    assert events.PluginTagToContent("hparams")  # the config as hparams, in the same event stream


def crash_plugin(directory):
    """A plugin distribution whose on_epoch_end hook crashes the run at epoch $CRASH_AT_EPOCH."""
    (directory / "crash_at_epoch.py").write_text(
        "import os\nimport ddpo\n\n\n@ddpo.hookimpl\ndef on_epoch_end(epoch):\n"
        "    if epoch == int(os.environ.get('CRASH_AT_EPOCH', '0')):\n"
        "        raise RuntimeError('simulated crash')\n")
    info = directory / "crash_at_epoch-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: crash-at-epoch\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[ddpo]\ncrash = crash_at_epoch\n")
    return directory


def test_resume_after_a_crash_continues_exactly_like_the_uninterrupted_run(is_run, tiny_sd, tmp_path):
    (tmp_path / "plugin").mkdir()
    plugin = crash_plugin(tmp_path / "plugin")
    args = ["--algo", "ddpo-is", "--reward", "compressibility", *TINY_SD, "--set", f"model.pretrained={tiny_sd}",
            *FULL_FINETUNE, "--epochs", "3", "--set", "eval.rewards=[incompressibility]",
            "--logdir", str(tmp_path), "--run-name", "crashed"]
    crashed = run_cli("run", *args, env={"PYTHONPATH": str(plugin), "CRASH_AT_EPOCH": "2"})
    assert crashed.returncode == 1 and "simulated crash" in crashed.stderr
    run_dir = tmp_path / "crashed"
    assert [path.name for path in (run_dir / "checkpoints").iterdir()] == ["epoch_0001"]

    resumed = run_cli("run", "--resume", str(run_dir), env={"PYTHONPATH": str(plugin)})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ignore = ("perf/",)
    ours = [{k: v for k, v in record.items() if not k.startswith(ignore)} for record in read_metrics(run_dir)]
    reference = [{k: v for k, v in record.items() if not k.startswith(ignore)} for record in read_metrics(is_run)]
    assert ours == reference
    final = load_file(run_dir / "checkpoints" / "epoch_0003" / "weights.safetensors")
    expected = load_file(is_run / "checkpoints" / "epoch_0003" / "weights.safetensors")
    assert final.keys() == expected.keys() and all(torch.equal(final[key], expected[key]) for key in final)
    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert [event.step for event in events.Scalars("reward/mean")] == [32, 64, 96]  # the crashed epoch is purged


def test_resume_can_extend_a_finished_run(is_run, tmp_path):
    import shutil

    run_dir = tmp_path / "extended"
    shutil.copytree(is_run, run_dir)
    result = run_cli("run", "--resume", str(run_dir), "--epochs", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [record["epoch"] for record in read_metrics(run_dir)] == [1, 2, 3, 4]
    assert sorted(path.name for path in (run_dir / "checkpoints").iterdir()) == ["epoch_0002", "epoch_0003",
                                                                                  "epoch_0004"]


def test_lora_checkpoint_loads_in_vanilla_diffusers(tiny_sd, tmp_path):
    from diffusers import StableDiffusionPipeline

    from ddpo.plugins.models.sd import StableDiffusion

    run_dir = train(tmp_path, "lora", "--algo", "ddpo-is", "--reward", "compressibility", *TINY_SD,
                    "--set", f"model.pretrained={tiny_sd}", "--epochs", "1")
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


def test_sample_command_writes_grids_of_the_base_and_fine_tuned_model(is_run, tmp_path):
    from PIL import Image

    checkpoint = is_run / "checkpoints" / "epoch_0003"
    tuned = run_cli("sample", "--checkpoint", str(checkpoint), "--num", "6", "--prompt", "cat", "--prompt", "dog",
                    "--out", str(tmp_path / "tuned.png"))
    assert tuned.returncode == 0, tuned.stderr[-2000:]
    base_config = yaml_config(is_run)
    base = run_cli("sample", "--model", "sd14", "--set", f"model.pretrained={base_config['model']['pretrained']}",
                   "--set", "sample.num_steps=4", "--num", "6", "--prompt", "cat", "--prompt", "dog",
                   "--out", str(tmp_path / "base.png"))
    assert base.returncode == 0, base.stderr[-2000:]
    tuned_image, base_image = Image.open(tmp_path / "tuned.png"), Image.open(tmp_path / "base.png")
    assert tuned_image.size == base_image.size == (3 * 66 + 2, 2 * 66 + 2)  # 3x2 grid of 64-pixel cells
    assert tuned_image.tobytes() != base_image.tobytes()


def yaml_config(run_dir):
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())
