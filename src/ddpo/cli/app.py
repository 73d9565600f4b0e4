"""The `ddpo` command line (DESIGN.md §4). Heavy modules (torch, diffusers) load only inside `run` and `sample`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from ddpo.cli.flags import (AlgoFlag, ConfigFlag, DeviceFlag, EpochsFlag, ModelFlag, PresetFlag, RewardFlag,
                            SeedFlag, SetFlag, checkpoint_config, config_layer)
from ddpo.core.configuration.config import resolve_config
from ddpo.core.configuration.errors import UsageError
from ddpo.core.configuration.layout import CONFIG_FILE
from ddpo.core.configuration.preflight import check_output_file, check_resume, check_run_directory
from ddpo.core.engine.startup import gc_paused
from ddpo.core.plugin_api.registry import KINDS, get_plugin_manager, get_registry


def _saved_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise UsageError(f"{run_dir} is not a run directory (no config.yaml); give RUN_DIR as {{logdir}}/{{run_name}}")
    return yaml.safe_load(path.read_text())


def build_app() -> typer.Typer:
    app = typer.Typer(name="ddpo", add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                      help="Fine-tune diffusion models with reinforcement learning. "
                           "`ddpo run` alone trains the embedded default (offline, CPU, minutes).")

    @app.command()
    def run(algo: AlgoFlag = None, reward: RewardFlag = None, model: ModelFlag = None, config: ConfigFlag = None,
            preset: PresetFlag = None, set_: SetFlag = None, epochs: EpochsFlag = None, seed: SeedFlag = None,
            logdir: Annotated[str | None, typer.Option("--logdir", help="Directory of run directories.")] = None,
            run_name: Annotated[str | None, typer.Option("--run-name", help="Run directory name.")] = None,
            resume: Annotated[Path | None, typer.Option("--resume", help="Run directory to continue from its "
                                                        "newest checkpoint.")] = None,
            device: DeviceFlag = None,
            profile: Annotated[bool, typer.Option("--profile", help="Write a torch profiler trace of one epoch "
                                                  "to RUN_DIR/profile/ (sampling, decode, reward, training "
                                                  "labelled).")] = False,
            distributed: Annotated[str | None, typer.Option("--distributed", help="Shard the training over "
                                                            "processes on this machine: fsdp, zero2 or zero3 "
                                                            "(accelerate launch with the config ddpo "
                                                            "ships).")] = None,
            num_processes: Annotated[int | None, typer.Option("--num-processes", min=1, help="Processes for "
                                                              "--distributed (default: one per GPU).")] = None):
        """Train: sample, score, update, log and checkpoint, epoch after epoch."""
        if num_processes is not None and distributed is None:
            raise UsageError("--num-processes goes with --distributed fsdp|zero2|zero3; without it, start "
                             "processes with accelerate launch --num_processes N -m ddpo run ...")
        base = None
        if resume is not None:
            base = _saved_config(resume)
        resolved = resolve_config(config, set_ or [], config_layer(algo, reward, model, epochs=epochs, seed=seed,
                                                                   logdir=logdir, run_name=run_name, device=device),
                                  base=base, preset=preset)
        if base is not None:
            check_resume(base, resolved.model_dump(mode="json"))
        check_run_directory(resolved.logdir, resolved.run_name, resume)
        if distributed is not None:
            from ddpo.cli.launch import launch_argv, run_argv

            argv = launch_argv(distributed, num_processes, resolved.mixed_precision, run_argv(
                algo=algo, reward=reward, model=model, config=config, preset=preset, set_=set_, epochs=epochs,
                seed=seed, logdir=logdir, run_name=run_name, resume=resume, device=device, profile=profile))
            os.execv(argv[0], argv)
        with gc_paused():  # torch, accelerate, tensorboard
            from ddpo.core.engine.trainer import train

        train(resolved, resume_dir=resume, profile=profile)

    @app.command("list")
    def list_plugins(kind: Annotated[str | None, typer.Argument(help="algorithms, rewards, models, prompts "
                                                                "or presets.")] = None,
                     as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False):
        """List the installed plugins: name, package, version, description (presets: paper and GPUs)."""
        if kind == "presets":
            from ddpo.core.configuration.presets import list_presets

            typer.echo(list_presets(get_registry().presets, as_json), nl=False)
            return
        if kind is not None and kind not in KINDS:
            raise UsageError(f"unknown plugin kind '{kind}'; valid: {', '.join(KINDS)}, presets")
        registry = get_registry()
        kinds = [kind] if kind else list(KINDS)
        listing = {name: [registry.plugins[name][item].as_dict() for item in registry.names(name)] for name in kinds}
        if as_json:
            typer.echo(json.dumps(listing, indent=2))
            return
        for name, items in listing.items():
            typer.echo(f"{name}:")
            for item in items:
                typer.echo(f"  {item['name']:<20} {item['package']} {item['version']:<8} {item['description']}")
                for option in item["options"]:
                    typer.echo(f"      {option['name']}: {option['type']} = {option['default']}  {option['help']}")
        for name, error in registry.failures.items():
            typer.echo(f"failed to load plugin '{name}': {error}", err=True)

    @app.command("config")
    def show_config(algo: AlgoFlag = None, reward: RewardFlag = None, model: ModelFlag = None,
                    config: ConfigFlag = None, preset: PresetFlag = None, set_: SetFlag = None,
                    epochs: EpochsFlag = None, seed: SeedFlag = None, device: DeviceFlag = None):
        """Print the merged config as YAML (what `ddpo run` with the same flags would use)."""
        resolved = resolve_config(config, set_ or [], config_layer(algo, reward, model, epochs=epochs, seed=seed,
                                                                   device=device), preset=preset)
        typer.echo(resolved.to_yaml(), nl=False)

    @app.command()
    def sample(out: Annotated[Path, typer.Option("--out", help="PNG file to write the image grid to (a video "
                                                 "model's: film strips; or a .gif, the videos animated).")],
               model: ModelFlag = None, config: ConfigFlag = None, set_: SetFlag = None,
               checkpoint: Annotated[Path | None, typer.Option("--checkpoint", help="A checkpoint directory "
                                                               "RUN/checkpoints/epoch_NNNN.")] = None,
               prompt: Annotated[list[str] | None, typer.Option("--prompt", help="Prompt, repeatable; default: "
                                                                "drawn from the prompt set.")] = None,
               num: Annotated[int, typer.Option("--num", min=1, help="Number of images.")] = 16,
               seed: SeedFlag = None, device: DeviceFlag = None):
        """Sample images from a model (a checkpoint's fine-tuned weights, or the base model) into a grid PNG."""
        if out.suffix.lower() not in (".png", ".gif"):
            raise UsageError(f"--out must be a .png file (or .gif for a video model), got '{out}'")
        resolved = resolve_config(config, set_ or [], config_layer(model=model, seed=seed, device=device),
                                  base=checkpoint_config(checkpoint))
        check_output_file(out, "give --out a file in a directory you can write to")
        with gc_paused():  # torch
            from ddpo.core.engine.sampling import sample_grid

        path = sample_grid(resolved, out, checkpoint=checkpoint, prompts=prompt or [], count=num)
        typer.echo(f"wrote {path}")

    @app.command()
    def compare(logdir: Annotated[Path, typer.Argument(help="A log directory (or one run directory).")],
                tag: Annotated[list[str] | None, typer.Option("--tag", help="Scalar tag, repeatable: the table "
                                                              "is about the first, the chart has a panel "
                                                              "per tag. Default reward/mean.")] = None,
                out: Annotated[Path | None, typer.Option("--out", help="PNG file for a chart of the tags "
                                                         "against reward queries (needs ddpo[plot]).")] = None,
                target: Annotated[float | None, typer.Option("--target", help="Also give the reward queries "
                                                             "each group took to reach this value.")] = None,
                as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of the table.")] = False):
        """Compare the runs under LOGDIR, grouped over seeds: a table (mean ± std over seeds) and a chart."""
        from ddpo.analysis.compare import load_groups, plot, summarize, table

        if out is not None and out.suffix.lower() != ".png":
            raise UsageError(f"--out must be a .png file, got '{out}'")
        tags = tag or ["reward/mean"]
        groups = load_groups(logdir, tags)
        typer.echo(json.dumps(summarize(groups, tags, target), indent=2) if as_json else table(groups, tags, target))
        if out is not None:
            typer.echo(f"wrote {plot(groups, tags, out)}", err=as_json)

    from ddpo.cli.pairs import pairs_app

    app.add_typer(pairs_app, name="pairs")
    from ddpo.cli.serve import register as register_serve_reward

    register_serve_reward(app)
    from ddpo.cli.launch import register as register_launch_config

    register_launch_config(app)
    from ddpo.cli.sweep import register as register_sweep

    register_sweep(app)
    get_plugin_manager().hook.register_commands(app=app)
    return app

