"""Performance options (issue 11): the `--profile` trace, torch.compile with LoRA and checkpoints, gradient
checkpointing, per-phase sampling precision, mixed precision end to end, the optimizer choice, and a registry
that does not scan every installed distribution. Timings live in benchmarks/ (vs_trl.py, bench_startup.py)."""

import functools
import json
import logging
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from ddpo.core.configuration.config import TrainConfig, resolve_config
from ddpo.core.configuration.errors import UsageError
from ddpo.core.engine.performance import compile_denoiser, make_optimizer, prepare_denoiser
from ddpo.core.engine.profiling import PHASES
from ddpo.core.engine.rollout import sample_batch
from ddpo.core.engine.startup import BITSANDBYTES_CPU_LOGGER, quiet_bitsandbytes_kernel_warning
from ddpo.core.plugin_api.registry import get_registry

TINY_DIGITS = ["--set", "sample.batch_size=8", "--set", "sample.batches_per_epoch=1", "--set", "sample.num_steps=4",
               "--set", "train.batch_size=8"]


def tiny_run_config(tmp_path, name, **overrides):
    """A 1-epoch, 2-step run on the tiny DDPM pipeline with LoRA, as a resolved config."""
    sets = ["sample.batch_size=4", "sample.batches_per_epoch=1", "sample.num_steps=2", "train.batch_size=4",
            "train.grad_accum=1", "model.use_lora=true", *[f"{key}={value}" for key, value in overrides.items()]]
    return resolve_config(sets=sets, flags={"model": {"name": "ddpm"}, "epochs": 1, "logdir": str(tmp_path),
                                            "run_name": name, "device": "cpu"})


def load_sd(tiny_sd, **options):
    model = get_registry().get("models", "sd14")({"pretrained": str(tiny_sd), **options})
    model.load(torch.device("cpu"), torch.float32)
    model.configure_training()
    return model


def test_profile_writes_a_trace_of_one_epoch_with_the_phases_labelled(forked_cli, tmp_path):
    result = forked_cli.run("run", *TINY_DIGITS, "--epochs", "1", "--logdir", str(tmp_path), "--run-name", "p",
                            "--profile")
    assert result.returncode == 0, result.stderr[-2000:]
    traces = sorted((tmp_path / "p" / "profile").iterdir())
    assert [trace.name for trace in traces] == ["epoch_0001.trace.json"]  # the only epoch (else the second)
    events = json.loads(traces[0].read_text())["traceEvents"]
    spans = {event["name"]: event for event in events if event.get("name") in PHASES.values()}
    assert set(spans) == set(PHASES.values())
    assert spans["ddpo/reward"]["tid"] != spans["ddpo/training"]["tid"]  # scored in the worker thread, traced too
    assert all(span["dur"] > 0 for span in spans.values())


@pytest.fixture
def fresh_accelerator_state():
    """In-process runs with different mixed precision need accelerate's process-wide state reset between them."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_compiled_denoiser_trains_with_lora_and_its_checkpoint_loads_back(tmp_path, tiny_ddpm, monkeypatch):
    """Dynamo's wrapper with LoRA and checkpoint names, on the eager backend: inductor's code generation took
    13 minutes for this tiny UNet on a loaded 2-core CPU (benchmarks/vs_trl.py measures the real thing)."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.utils.counters.clear()
    model = get_registry().get("models", "ddpm")({"pretrained": str(tiny_ddpm), "use_lora": True, "compile": True})
    model.load(torch.device("cpu"), torch.float32)
    model.configure_training()
    compile_denoiser(model)
    assert isinstance(model.denoiser, torch._dynamo.eval_frame.OptimizedModule)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    sample = torch.randn(2, *model.sample_shape())
    model.predict_noise(sample, torch.tensor([500, 500]), None, 1.0).square().mean().backward()
    optimizer.step()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # the forward went through dynamo

    model.save_weights(tmp_path)
    weights = load_file(str(tmp_path / "weights.safetensors"))
    assert weights and all("lora" in name and "_orig_mod" not in name for name in weights)
    fresh = get_registry().get("models", "ddpm")({"pretrained": str(tiny_ddpm), "use_lora": True, "compile": True})
    fresh.load(torch.device("cpu"), torch.float32)
    fresh.configure_training()
    compile_denoiser(fresh)
    fresh.load_weights(tmp_path)  # into a compiled model, as a resumed run does
    loaded = fresh.trainable_state_dict()
    assert set(loaded) == set(weights) and all(torch.equal(loaded[name], weights[name]) for name in weights)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_sd):
    model = load_sd(tiny_sd)
    generator = torch.Generator().manual_seed(0)
    trajectory, _ = sample_batch(model, ["a cat", "a dog"], [{}, {}], num_steps=2, eta=1.0, guidance_scale=5.0,
                                 generator=generator)

    def gradients():
        model.denoiser.train()
        model.denoiser.zero_grad()
        transitions = next(iter(trajectory.training_transitions(2, torch.Generator().manual_seed(0), 1.0)))
        log_prob, *_ = model.step_log_prob(transitions, eta=1.0, guidance_scale=5.0)
        log_prob.sum().backward()
        return [parameter.grad.clone() for parameter in model.trainable_parameters()]

    plain = gradients()
    prepare_denoiser(model, gradient_checkpointing=True)
    assert model.denoiser.is_gradient_checkpointing
    checkpointed = gradients()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, checkpointed, strict=True))


def test_sampling_precision_applies_to_sampling_only_and_log_probs_stay_float32(tiny_sd):
    model = load_sd(tiny_sd, sample_precision="bf16", channels_last=True)
    prepare_denoiser(model, gradient_checkpointing=False)
    training_autocast = model.autocast

    def sample():
        return sample_batch(model, ["a cat"], [{}], num_steps=3, eta=1.0, guidance_scale=5.0,
                            generator=torch.Generator().manual_seed(0))[0]

    full = sample()
    with model.sampling():
        low = sample()
    assert model.autocast is training_autocast  # restored after the phase
    # log N(x'; mu, s^2) of the step's own draw x' = mu + s z is -z^2/2 - log s - log sqrt(2 pi) whatever mu is: with
    # the same noise the bf16 forwards change the states but not these, if the log-prob math stays in float32
    assert low.log_probs.dtype == torch.float32
    assert torch.allclose(low.log_probs, full.log_probs, rtol=0, atol=1e-4), (low.log_probs, full.log_probs)
    assert not torch.equal(low.latents, full.latents)  # the forwards did run in bf16
    assert (low.latents - full.latents).abs().mean() < 0.1


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_end_to_end(tmp_path, tiny_ddpm, precision, fresh_accelerator_state):
    """A whole epoch under accelerate's autocast. On a CPU, accelerate runs fp16 as float32 (no fp16 autocast):
    the run must still work; bf16 autocast is real here."""
    from ddpo.core.engine.trainer import train

    config = tiny_run_config(tmp_path, precision, **{"model.pretrained": str(tiny_ddpm)})
    config.mixed_precision = precision
    run_dir = train(config)
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert all(value == value for value in record.values() if isinstance(value, float))  # no NaN
    assert record["reward_queries"] == 4 and record["train/optimizer_steps"] == 1
    assert record["train/skipped_steps"] == 0 and record["policy/ratio_dev_first"] < 1e-2  # recomputed in autocast


def test_optimizer_choice_and_a_clear_error_without_bitsandbytes(monkeypatch):
    parameters = [torch.nn.Parameter(torch.zeros(3))]
    assert isinstance(make_optimizer(parameters, TrainConfig()), torch.optim.AdamW)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what `import bitsandbytes` meets when not installed
    with pytest.raises(UsageError, match="needs bitsandbytes"):
        make_optimizer(parameters, TrainConfig(optimizer="adamw8bit"))


def test_a_run_starts_without_the_bitsandbytes_kernel_warning_or_the_server_stack(tmp_path):
    """A fresh `ddpo run` with the 8-bit optimizer imports bitsandbytes (a dev dependency; diffusers imports it too,
    at its first model import). On CPUs with AVX512-BF16 bitsandbytes then logs that it could not fetch a 4-bit
    kernel from the hub; ddpo drops that line (`ddpo.core.engine.startup`). The run imports no reward-server library."""
    probe = textwrap.dedent(f"""
        import sys
        from ddpo.cli import main
        try:
            main(["run", "--epochs", "1", "--logdir", {str(tmp_path)!r}, "--set", "train.optimizer=adamw8bit",
                  *{TINY_DIGITS!r}])
        except SystemExit as exit:
            assert exit.code in (0, None), exit.code
        print("BITSANDBYTES", "bitsandbytes" in sys.modules,
              "SERVER", sorted(name for name in ("fastapi", "starlette", "uvicorn") if name in sys.modules))
    """)
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "BITSANDBYTES True SERVER []" in result.stdout
    assert "gemm_4bit" not in result.stderr and "kernels-community" not in result.stderr, result.stderr


def test_only_the_bitsandbytes_kernel_warning_is_dropped(caplog):
    quiet_bitsandbytes_kernel_warning()
    logger = logging.getLogger(BITSANDBYTES_CPU_LOGGER)
    logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
                   "`pip install kernels` and the kernels >= 0.11.1", "could not verify publisher trust status")
    logger.warning("another bitsandbytes warning")
    assert [record.getMessage() for record in caplog.records] == ["another bitsandbytes warning"]


def test_8bit_adamw_trains_keeps_uint8_moments_and_resumes_exactly(tmp_path, tiny_ddpm, fresh_accelerator_state):
    """bitsandbytes' AdamW8bit (a dev dependency, so this runs) on a full fine-tune: the moments of the large
    weights are uint8 in the checkpoint, and 1 epoch + resume gives the uninterrupted 2-epoch run's weights."""
    from ddpo.core.engine.trainer import train

    def config(name, epochs):
        run = tiny_run_config(tmp_path, name, **{"model.pretrained": str(tiny_ddpm), "model.use_lora": "false",
                                                 "train.optimizer": "adamw8bit", "save_every": 1})
        run.epochs = epochs
        return run

    straight = train(config("straight", 2))
    resumed = train(config("resumed", 1))
    train(config("resumed", 2), resume_dir=resumed)
    state = torch.load(straight / "checkpoints" / "epoch_0002" / "optimizer.pt", weights_only=True)["state"]

    def moments(entry: dict):  # bitsandbytes nests its per-parameter tensors one dict down in its state_dict
        for key, value in entry.items():
            yield from moments(value) if isinstance(value, dict) else [value] if key.startswith("state") else []

    moment_types = {moment.dtype for entry in state.values() for moment in moments(entry)}
    assert moment_types == {torch.uint8, torch.float32}  # 8-bit for weights of >= 4096 entries, 32-bit below
    weights = [load_file(run / "checkpoints" / "epoch_0002" / "weights.safetensors") for run in (straight, resumed)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    first = load_file(straight / "checkpoints" / "epoch_0001" / "weights.safetensors")
    assert any(not torch.equal(first[name], weights[0][name]) for name in first)  # epoch 2 trained


def test_registry_knows_plugin_packages_without_scanning_every_distribution():
    """`ddpo list` took 2.5 s when each plugin's package came from importlib.metadata.packages_distributions()."""
    script = ("import importlib.metadata as m\n"
              "def refuse(): raise AssertionError('packages_distributions called')\n"
              "m.packages_distributions = refuse\n"
              "from ddpo.core.plugin_api.registry import get_registry\n"
              "info = get_registry().plugins['models']['digits']\n"
              "print(info.package, info.version)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    from importlib.metadata import version

    assert result.stdout.split() == ["ddpo", version("ddpo")]


def test_gc_paused_restores_the_collector_as_it_was_even_after_an_error():
    import gc

    from ddpo.core.configuration.errors import UsageError
    from ddpo.core.engine.startup import gc_paused
    from ddpo.core.plugin_api.model import load_pretrained

    assert gc.isenabled()
    with pytest.raises(UsageError, match="model.pretrained is empty"):
        load_pretrained("DDPMPipeline", "")  # fails inside the paused block
    assert gc.isenabled()
    with gc_paused():
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the inner block restores the outer block's state
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()  # paused by someone else before: stays so
    finally:
        gc.enable()
