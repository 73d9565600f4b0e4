"""End-to-end runs of `ddpo run` on tiny pipelines: learning, the run directory, TensorBoard read back,
extending a finished run, LoRA export loadable by diffusers, and `ddpo sample`. (Exact resume after a crash,
for every algorithm, is in test_reliability.py.)"""


import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


# Small, fast settings for the tiny random SD pipeline: 4 steps, 8 samples in one batch, all weights trained.
TINY_SD = ["--model", "sd14", "--set", "sample.num_steps=4", "--set", "sample.batch_size=8",
           "--set", "sample.batches_per_epoch=1", "--set", "train.batch_size=4", "--set", "train.grad_accum=2",
           "--set", "model.use_lora=false", "--set", "train.learning_rate=1e-3"]
EPOCHS = 4
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


# -- one update on Stable Diffusion moves each trajectory's log-probability the way its advantage says -----------

ADVANTAGES = torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0, 1.0, -1.0, 1.0])


def sd_update(tiny_sd, tmp_path, algorithm_name, advantages):
    """One update of `algorithm_name` on 8 trajectories of the tiny SD pipeline with LoRA and guidance 5, given
    `advantages`; returns each trajectory's change of summed log-probability over its policy steps."""
    from accelerate import Accelerator

    from ddpo.core.configuration.config import resolve_config
    from ddpo.core.engine.rollout import sample_batch
    from ddpo.core.engine.run import Run
    from ddpo.core.plugin_api.registry import get_registry
    from ddpo.plugins.models.sd import StableDiffusion

    config = resolve_config(None, ["sample.num_steps=4", "sample.batch_size=8", "sample.batches_per_epoch=1",
                                   "train.batch_size=4", "train.grad_accum=2", "train.learning_rate=1e-1",
                                   "train.adam_epsilon=1",
                                   "algorithm.group_size=2" if algorithm_name == "grpo" else "epochs=1"],
                            {"model": {"name": "sd14"}, "algorithm": {"name": algorithm_name}})
    model = StableDiffusion({"pretrained": str(tiny_sd)})
    model.load(torch.device("cpu"), torch.float32)
    torch.manual_seed(0)  # LoRA's A matrices come from the global generator, which xdist's test order leaves anywhere
    model.configure_training()
    algorithm = get_registry().get("algorithms", algorithm_name)(config.algorithm.options())
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=config.train.learning_rate,
                                  eps=config.train.adam_epsilon)  # eps 1: a step along the gradient, not its sign
    model.denoiser, optimizer = accelerator.prepare(model.denoiser, optimizer)
    run = Run(config=config, accelerator=accelerator, model=model, reward=None, algorithm=algorithm,
              prompt_set=None, run_dir=tmp_path, optimizer=optimizer, stat_tracker=None, epoch=1)
    prompts = ["a cat", "a cat", "a dog", "a dog", "an owl", "an owl", "a fox", "a fox"]
    trajectory, _ = sample_batch(model, prompts, [{}] * 8, num_steps=4, eta=1.0, guidance_scale=5.0,
                                 generator=torch.Generator().manual_seed(0))
    trajectory.advantages = advantages

    def summed_log_probs():
        with torch.no_grad():
            columns = [model.step_log_prob(trajectory.transitions(torch.full((8,), step)), 1.0, 5.0)[0]
                       for step in range(4)]
        return torch.stack(columns, dim=1)[trajectory.policy_steps].reshape(8, -1).sum(dim=1)

    before = summed_log_probs()
    metrics = algorithm.update(run, trajectory)
    assert metrics["train/optimizer_steps"] == 1
    return summed_log_probs() - before


@pytest.mark.parametrize("algorithm", ["ddpo-is", "ddpo-sf", "grpo"])
def test_one_update_on_sd_raises_the_log_prob_of_positive_advantage_trajectories(algorithm, tiny_sd, tmp_path):
    """Every trajectory with A > 0 becomes more likely and every one with A < 0 less (LoRA on the tiny SD UNet,
    guidance in training). The control: the same update with the advantages shuffled among the trajectories
    follows the shuffled ones, so against the true advantages it agrees on only half of them.

    lr 1e-1 keeps the update first-order (the changes scale with lr from 1e-2) while the smallest change, 3.7e-5
    over LoRA seeds 0-4, is ~150 float32 steps of a log-probability near 2: at lr 1e-2 the smallest were within
    a few steps, and another CPU's rounding turned one to 0."""
    change = sd_update(tiny_sd, tmp_path, algorithm, ADVANTAGES)
    assert (change.sign() == ADVANTAGES.sign()).all(), change
    shuffled = ADVANTAGES[torch.randperm(8, generator=torch.Generator().manual_seed(0))]  # agrees on 4 of 8
    control = sd_update(tiny_sd, tmp_path, algorithm, shuffled)
    assert (control.sign() == shuffled.sign()).all(), control
    assert (control.sign() == ADVANTAGES.sign()).float().mean() == 0.5, (shuffled, control)


def test_run_directory_has_the_contract_layout(is_run):
    records = read_metrics(is_run)
    assert [record["epoch"] for record in records] == list(range(1, EPOCHS + 1))
    assert [record["reward_queries"] for record in records] == [8 * epoch for epoch in range(1, EPOCHS + 1)]
    for record in records:
        for tag in DESIGN_TAGS + ["eval/incompressibility/mean"]:
            assert isinstance(record[tag], float), tag  # JSON floats, as the contract casts them
        assert record["train/optimizer_steps"] == 1  # 8 samples / (train.batch_size 4 x grad_accum 2)
        # ... taken after every pass: all of them at the sampling policy (to float32 rounding of recomputed passes)
        assert record["policy/ratio_mean"] == pytest.approx(1, abs=1e-6) and record["policy/approx_kl"] < 1e-12
        assert record["policy/clipfrac"] == 0
        assert record["loss/total"] == record["loss/policy"]
        assert record["reward/min"] <= record["reward/mean"] <= record["reward/max"] < 0  # minus JPEG sizes
        assert record["reward/std"] <= (record["reward/max"] - record["reward/min"]) / 2 + 1e-6
        assert record["perf/samples_per_second"] == pytest.approx(8 / record["perf/epoch_seconds"], rel=1e-6)
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
    steps = [8 * epoch for epoch in range(1, EPOCHS + 1)]
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
