"""The run configuration: pydantic models for the keys of DESIGN.md §5, and how layers of it are merged.

Precedence, lowest first: built-in defaults < the model's, then the algorithm's `run_defaults` (with its
`model_run_defaults` for the chosen model over them) < plugin
option defaults < `--preset` (a paper's recipe, `ddpo.core.configuration.presets`) < `--config` file (YAML or TOML)
< `--set KEY=VALUE` < named flags (`--epochs` ...).
Plugin sections (`algorithm`, `reward`, `model`, `prompts`) hold a `name` plus that plugin's options,
validated by the plugin's own `Options`. When a layer names a different plugin, the options of the layers
below it for that section are dropped (they belonged to the other plugin).
"""

from __future__ import annotations

import random
import tomllib
from pathlib import Path
from typing import Any, Literal, get_args

import pydantic
import yaml

from ddpo.core.configuration.errors import UsageError
from ddpo.core.engine.multireward import expand_reward_sum

PLUGIN_SECTIONS = {"algorithm": "algorithms", "reward": "rewards", "model": "models", "prompts": "prompts"}


class Section(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", use_attribute_docstrings=True, coerce_numbers_to_str=True)


class PluginSection(pydantic.BaseModel):
    """A plugin's name and its options (validated against the plugin's `Options`)."""

    model_config = pydantic.ConfigDict(extra="allow", coerce_numbers_to_str=True)
    name: str

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class SDEWindow(Section):
    """The steps sampled with the stochastic step (`sample.eta`); the others take the deterministic one (eta 0: DDIM's
    or the flow's Euler step) and have no log-probabilities, so only the window's steps are trained (MixGRPO,
    arXiv 2507.21802; Flow-GRPO-Fast). The window is the same for every sample of an epoch and moves between
    epochs (`placement`). See docs/models.md, "SDE windows"."""

    size: int = pydantic.Field(ge=1)
    """Steps in the window (MixGRPO: 4; Flow-GRPO-Fast: 2 or 3)."""
    placement: Literal["sliding", "random"] = "sliding"
    """sliding (MixGRPO): the window starts at `start` and moves `stride` steps every `shift_every` epochs, back to
    `start` when it would pass `end`; random (Flow-GRPO-Fast): each epoch's window starts at a step drawn uniformly
    from start..end - size (the run seed and the epoch draw it, the same on every process)."""
    stride: int = pydantic.Field(1, ge=0)
    """Steps the sliding window moves at a shift (MixGRPO: 1; 0 keeps it in place)."""
    shift_every: int = pydantic.Field(1, ge=1)
    """Epochs between the sliding window's shifts (MixGRPO: 25 training iterations, each one sampling and update)."""
    start: int = pydantic.Field(0, ge=0)
    """First step the window may cover (0: the noisiest)."""
    end: int | None = pydantic.Field(None, ge=1)
    """The window covers steps below this one; unset: num_steps - 1, never the last step (as MixGRPO and
    Flow-GRPO-Fast)."""

    def bounds(self, num_steps: int) -> tuple[int, int]:
        """`(start, end)`: the steps the window may cover, start <= step < end."""
        return self.start, num_steps - 1 if self.end is None else self.end

    def steps(self, num_steps: int, epoch: int, seed: int) -> tuple[int, int]:
        """`(first, stop)`: epoch `epoch`'s window (epochs count from 1), steps first <= step < stop."""
        start, end = self.bounds(num_steps)
        if self.placement == "random":
            first = random.Random(f"sde-window/{seed}/{epoch}").randint(start, end - self.size)
        else:
            positions = 1 if self.stride == 0 else (end - self.size - start) // self.stride + 1
            first = start + ((epoch - 1) // self.shift_every % positions) * self.stride
        return first, first + self.size


class SampleConfig(Section):
    batch_size: int = pydantic.Field(8, ge=1)
    """Trajectories sampled per batch, per process."""
    batches_per_epoch: int = pydantic.Field(4, ge=1)
    """Sampling batches per epoch; samples per epoch = batch_size x batches_per_epoch x processes."""
    num_steps: int = pydantic.Field(50, ge=1)
    """Denoising steps per trajectory."""
    eta: float = pydantic.Field(1.0, ge=0.0, le=1.0)
    """DDIM noise weight: 1.0 is fully stochastic; 0 is deterministic and refused by log-prob algorithms."""
    sde: Literal["flow-grpo", "dance-grpo", "cps"] = "flow-grpo"
    """Flow-matching models only (sd3, flux, wan): the stochastic step, `eta` its noise level. flow-grpo,
    Flow-GRPO's SDE with the ODE's marginals, std eta sqrt(sigma / (1 - sigma)) sqrt(-dt); dance-grpo, DanceGRPO's, std
    eta sqrt(sigma - sigma'); cps, the coefficients-preserving sampler, std sigma' sin(eta pi / 2). Formulas
    and sources in docs/models.md; DDIM and DDPM refuse any but flow-grpo."""
    guidance_scale: float = pydantic.Field(5.0, ge=0.0)
    """Classifier-free guidance weight, in sampling and in training (1 or less: no guidance); for FLUX.1-dev, the
    input of its guidance embedding instead (no unconditional branch)."""
    sde_window: SDEWindow | None = None
    """Sample only a window of steps stochastically (`eta`) and the others with the deterministic step; only the
    window's steps have log-probabilities and are trained. Unset: every step stochastic. DDIM and flow models; DDPM
    ignores eta and refuses it."""


class TrainConfig(Section):
    batch_size: int = pydantic.Field(4, ge=1)
    """Trajectories per training minibatch, per process."""
    grad_accum: int = pydantic.Field(4, ge=1)
    """Minibatches whose gradients (over all trained steps) make one optimizer step."""
    learning_rate: float = pydantic.Field(3e-4, gt=0)
    """AdamW learning rate for the policy (3e-4 suits LoRA; full fine-tuning wants about 1e-5)."""
    weight_decay: float = pydantic.Field(1e-4, ge=0)
    """AdamW weight decay."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    adam_epsilon: float = pydantic.Field(1e-8, gt=0)
    """AdamW epsilon."""
    inner_epochs: int = pydantic.Field(1, ge=1)
    """Passes over each epoch's samples."""
    timestep_fraction: float = pydantic.Field(1.0, gt=0, le=1)
    """Fraction of each trajectory's policy steps trained on: int(steps x fraction) of them, at least one."""
    timestep_selection: Literal["random", "first"] = "random"
    """Which of the steps `timestep_fraction` trains, in which order: random, each sample's own random subset in a
    random order (DDPO); first, the first ones in order, the same for every sample (Flow-GRPO: with 10 steps and
    0.99, steps 0-8, never the last)."""
    steps_per_pass: int = pydantic.Field(1, ge=1)
    """Trained steps of a minibatch stacked into one forward pass of the denoiser (batch_size x steps_per_pass
    rows). The update is the same (an optimizer step sums a minibatch's steps either way); larger passes run a
    small model much faster and hold more activations. Used by the step-wise algorithms (ddpo-is/sf, dpok,
    grpo, d3po); tdpo-r (one step position at a time) and rwr (final samples) do not stack steps."""
    max_grad_norm: float = pydantic.Field(1.0, gt=0)
    """Gradients are clipped to this norm before each optimizer step."""
    ema_decay: float = pydantic.Field(0.0, ge=0, lt=1)
    """Keep an exponential moving average of the trained weights with this decay (0: none), with Flow-GRPO's
    warm-up (ddpo.core.engine.ema): after n updates the decay is min(decay, (1 + n) / (10 + n)). Checkpoints'
    weights.safetensors (what `ddpo sample` loads) and their LoRA export hold it, and the fixed evaluation set
    (eval.num_steps) samples with it; training goes on from the trained weights (training_weights.safetensors).
    Flow-GRPO: 0.9 every 8 steps."""
    ema_every: int = pydantic.Field(1, ge=1)
    """Update the moving average after every N-th optimizer step."""
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    """The policy's optimizer: torch's AdamW, or bitsandbytes' 8-bit AdamW (needs bitsandbytes installed)."""
    gradient_from_sampling: bool = False
    """Take the on-policy samples' gradient (DDPO-IS, GRPO: the first optimizer step's samples; DDPO-SF: all) from
    the sampling pass instead of a second forward pass (ddpo.core.engine.onpolicy): the same update, one forward
    pass per denoising step fewer for those samples. Needs LoRA, timestep_fraction 1 and the sampling precision of
    training; ddpo-is without kl_weight, ddpo-sf, or grpo without kl_beta."""
    gradient_checkpointing: bool = False
    """Recompute the denoiser's activations in the backward pass: less memory, about a third more compute."""
    max_skipped_steps: int = pydantic.Field(10, ge=1)
    """An optimizer step with a non-finite loss or gradient is skipped (train/skipped_steps); this many in a row
    stop the run with an error, its checkpoints intact."""
    grad_norm_spike_factor: float | None = pydantic.Field(None, gt=1)
    """Count a step whose gradient norm exceeds this factor times the running average of earlier norms as a
    spike (train/grad_norm_spikes); unset: no spike detection."""


class AdvantageConfig(Section):
    per_prompt_stat_tracking: bool = True
    """Normalise rewards per prompt with a running buffer (else over the epoch's whole batch)."""
    buffer_size: int = pydantic.Field(32, ge=1)
    """Rewards kept per prompt."""
    min_count: int = pydantic.Field(16, ge=1)
    """Below this many buffered rewards for a prompt, use the batch mean and std instead."""
    clip_max: float = pydantic.Field(5.0, gt=0)
    """Advantages are clipped to [-clip_max, clip_max]."""


class EvalConfig(Section):
    rewards: list[str | PluginSection] = []
    """Other rewards to score samples with (cross-reward evaluation): names, or sections with options validated
    like `reward` ([{name: digit, target: 3}, legibility]); logged as eval/<label>/mean, the label being the name,
    followed by ':key=value,...' for the options given (eval/digit:target=3/mean)."""
    every: int = pydantic.Field(1, ge=1)
    """Evaluate every N epochs."""
    num_steps: int | None = pydantic.Field(None, ge=1)
    """Denoising steps of a separate evaluation sampling: a fixed set of prompts and seeds (the same every
    epoch, sample.batch_size images per process), scored by the training reward and every eval reward, its grid
    saved as eval/epoch_NNNN.png and logged as eval/images with the text eval/captions; unset: the eval rewards
    score the epoch's training samples. Training log-probs are unaffected either way."""

    def sections(self) -> list[PluginSection]:
        """Every eval reward as a plugin section."""
        return [PluginSection(name=entry) if isinstance(entry, str) else entry for entry in self.rewards]


def eval_label(section: PluginSection) -> str:
    """The tag label of an eval reward: its name, then ':key=value,...' for the options given."""
    options = section.options()
    if not options:
        return section.name
    return section.name + ":" + ",".join(f"{key}={value}" for key, value in sorted(options.items()))


class RunConfig(Section):
    """Everything a run needs; `config.yaml` in the run directory holds it resolved."""

    seed: int = 0
    """Random seed; each process and each epoch derive their own streams from it."""
    epochs: int = pydantic.Field(100, ge=1)
    """Epochs to train; an epoch samples, scores, and updates once."""
    logdir: str = "runs"
    """Directory that holds run directories."""
    run_name: str | None = None
    """Run directory name; default {algo}__{reward}__{model}__s{seed}__{YYYYmmdd-HHMMSS}."""
    device: str = pydantic.Field("auto", pattern=r"^(auto|cpu|mps|cuda)$")
    """auto (a GPU if there is one), cpu, cuda or mps; under accelerate launch each process takes its own GPU."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """Autocast dtype for the networks; log-prob math always runs in float32."""
    save_every: int = pydantic.Field(1, ge=1)
    """Checkpoint every N epochs; the last epoch is always saved."""
    keep_checkpoints: int = pydantic.Field(3, ge=0)
    """Keep only the newest N checkpoints (0 keeps all)."""
    algorithm: PluginSection = PluginSection(name="ddpo-is")
    """The algorithm plugin and its options."""
    reward: PluginSection = PluginSection(name="digit")
    """The training reward plugin and its options."""
    model: PluginSection = PluginSection(name="digits")
    """The model plugin and its options (pretrained, use_lora, lora_rank, scheduler, ...)."""
    prompts: PluginSection = PluginSection(name="simple_animals")
    """The prompt set and its options."""
    sample: SampleConfig = SampleConfig()
    train: TrainConfig = TrainConfig()
    advantage: AdvantageConfig = AdvantageConfig()
    eval: EvalConfig = EvalConfig()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML or TOML file as a dict."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        else:
            raise UsageError(f"config file {path} must end in .yaml, .yml or .toml")
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as error:
        raise UsageError(f"cannot parse config file {path}: {' '.join(str(error).split())}") from None
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must hold a mapping of keys, not {type(data).__name__}")
    return data


def parse_set(assignment: str) -> dict[str, Any]:
    """`a.b=value` as {"a": {"b": value}}, the value parsed as a YAML scalar or flow collection."""
    key, separator, raw = assignment.partition("=")
    if not separator or not key.strip():
        raise UsageError(f"--set expects KEY=VALUE (e.g. --set train.learning_rate=1e-4), got '{assignment}'")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    nested: dict[str, Any] = {}
    cursor = nested
    parts = key.strip().split(".")
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value
    return nested


def merge(lower: dict[str, Any], upper: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `upper` over `lower`. A plugin section that changes `name` replaces the lower one."""
    merged = dict(lower)
    for key, value in upper.items():
        below = merged.get(key)
        if isinstance(value, dict) and isinstance(below, dict):
            renamed = key in PLUGIN_SECTIONS and "name" in below and value.get("name", below["name"]) != below["name"]
            merged[key] = dict(value) if renamed else merge(below, value)
        else:
            merged[key] = value
    return merged


def _valid_keys(model: type[pydantic.BaseModel], location: tuple) -> list[str]:
    """The field names of the (nested) pydantic model at `location`."""
    for part in location:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        models = [option for option in (annotation, *get_args(annotation))  # a model, or an optional one
                  if isinstance(option, type) and issubclass(option, pydantic.BaseModel)]
        if not models:
            break
        model = models[0]
    return sorted(model.model_fields)


def describe_validation_error(error: pydantic.ValidationError, model: type[pydantic.BaseModel],
                              prefix: str = "", extra_valid: list[str] | None = None) -> str:
    """One line naming the key that is wrong and what would be valid."""
    first = error.errors()[0]
    location = tuple(first["loc"])
    key = ".".join(str(part) for part in ((prefix,) if prefix else ()) + location)
    if first["type"] == "extra_forbidden":
        valid = sorted(set(_valid_keys(model, location[:-1])) | set(extra_valid or []))
        return f"unknown config key '{key}'; valid keys here: {', '.join(valid)}"
    return f"invalid value for '{key}': {first['msg']} (got {first['input']!r})"


def validate_run_config(data: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except pydantic.ValidationError as error:
        raise UsageError(describe_validation_error(error, RunConfig)) from None


def resolve_config(config_file: str | Path | None = None, sets: list[str] | tuple[str, ...] = (),
                   flags: dict[str, Any] | None = None, base: dict[str, Any] | None = None,
                   preset: str | None = None) -> RunConfig:
    """Merge every layer, validate it and every plugin's options, and return the resolved config.

    Args:
        config_file: a YAML or TOML file.
        sets: `KEY=VALUE` assignments from `--set`.
        flags: named flags as nested config values (None values are ignored).
        base: a lowest user layer (the saved config of a run being resumed).
        preset: the name of a registered preset, a layer under `base`.
    """
    from ddpo.core.configuration.presets import find_preset
    from ddpo.core.plugin_api.registry import get_registry

    user = find_preset(get_registry().presets, preset).config if preset is not None else {}
    user = merge(user, base or {})
    if config_file is not None:
        user = merge(user, load_config_file(config_file))
    for assignment in sets:
        user = merge(user, parse_set(assignment))
    user = expand_reward_sum(merge(user, _drop_none(flags or {})))  # --reward a+b: the multi reward

    defaults = RunConfig().model_dump(mode="json")
    chosen = validate_run_config(merge(defaults, user))
    registry = get_registry()
    model_cls = registry.get("models", chosen.model.name)
    algorithm_cls = registry.get("algorithms", chosen.algorithm.name)
    algorithm_defaults = merge(algorithm_cls.run_defaults, algorithm_cls.model_run_defaults.get(chosen.model.name, {}))
    layered = merge(merge(merge(defaults, model_cls.run_defaults), algorithm_defaults), user)
    config = validate_run_config(layered)

    for section, kind in PLUGIN_SECTIONS.items():
        plugin_section: PluginSection = getattr(config, section)
        cls = registry.get(kind, plugin_section.name)
        try:
            options = cls.Options.model_validate(plugin_section.options())
        except pydantic.ValidationError as error:
            raise UsageError(describe_validation_error(error, cls.Options, prefix=section, extra_valid=["name"])
                             + f" (options of {kind.rstrip('s')} '{plugin_section.name}')") from None
        setattr(config, section, PluginSection(name=plugin_section.name, **options.model_dump(mode="json")))
    for index, section in enumerate(config.eval.sections()):
        cls = registry.get("rewards", section.name)
        try:
            cls.Options.model_validate(section.options())
        except pydantic.ValidationError as error:
            raise UsageError(describe_validation_error(error, cls.Options, prefix=f"eval.rewards[{index}]",
                                                       extra_valid=["name"])
                             + f" (options of reward '{section.name}')") from None
    _check_consistency(config, algorithm_cls(config.algorithm.options()))
    return config


def _drop_none(values: dict[str, Any]) -> dict[str, Any]:
    return {key: _drop_none(value) if isinstance(value, dict) else value
            for key, value in values.items() if value is not None and value != {}}


def _check_consistency(config: RunConfig, algorithm) -> None:
    """Checks that span sections."""
    scheduler = config.model.options().get("scheduler")
    if config.sample.sde != "flow-grpo" and scheduler != "flow-sde":
        raise UsageError(f"sample.sde={config.sample.sde} is a flow-matching sampler, but model "
                         f"'{config.model.name}' samples with {scheduler or 'its own scheduler'}; use a flow model "
                         "(sd3, flux, wan) or leave sample.sde at flow-grpo")
    if config.sample.sde_window is not None:
        _check_sde_window(config)
    elif algorithm.needs_sde_window:
        raise UsageError(f"algorithm '{algorithm.name}' trains a window of SDE steps: set sample.sde_window (e.g. "
                         "--set sample.sde_window.size=4), or use grpo for every step")
    if algorithm.needs_log_probs and config.sample.eta == 0 and config.model.options().get("scheduler") != "ddpm":
        raise UsageError(f"sample.eta=0 makes DDIM sampling deterministic, so algorithm '{algorithm.name}' has no "
                         "log-probabilities to train on; use sample.eta > 0 (1.0 is standard)")
    group = algorithm.group_size()
    per_process = config.sample.batch_size * config.sample.batches_per_epoch
    if group <= config.sample.batch_size and config.sample.batch_size % group:
        raise UsageError(f"sample.batch_size={config.sample.batch_size} must be a multiple of algorithm "
                         f"'{algorithm.name}' group size {group}")
    if group > config.sample.batch_size and per_process % group and group % per_process:
        raise UsageError(f"algorithm '{algorithm.name}' group size {group} spans batches: samples per process "
                         f"(sample.batch_size x sample.batches_per_epoch = {per_process}) must be a multiple or a "
                         f"divisor of it")
    if algorithm.keeps_groups_together and config.train.batch_size % group:
        raise UsageError(f"train.batch_size={config.train.batch_size} must be a multiple of algorithm "
                         f"'{algorithm.name}' group size {group} (a group trains in one minibatch)")
    samples = config.sample.batch_size * config.sample.batches_per_epoch
    per_step = config.train.batch_size * config.train.grad_accum
    if samples % per_step:
        raise UsageError(f"samples per epoch per process (sample.batch_size x sample.batches_per_epoch = {samples}) "
                         f"must be a multiple of train.batch_size x train.grad_accum = {per_step}")
    if config.train.gradient_from_sampling:
        _check_gradient_from_sampling(config, algorithm)


def _check_sde_window(config: RunConfig) -> None:
    """A window that fits the schedule, on a sampler whose eta turns the noise off."""
    window, steps = config.sample.sde_window, config.sample.num_steps
    if config.model.options().get("scheduler") == "ddpm":
        raise UsageError("sample.sde_window needs a sampler whose eta=0 step is deterministic; DDPM ignores eta: use "
                         "model.scheduler=ddim or leave sample.sde_window unset")
    start, end = window.bounds(steps)
    if end > steps or start + window.size > end:
        raise UsageError(f"sample.sde_window: a window of {window.size} steps from step {start} must end by step "
                         f"{end} (sde_window.end, default num_steps - 1) within sample.num_steps={steps}; valid: "
                         f"start + size <= end <= num_steps")
    if config.sample.eta == 0:
        raise UsageError("sample.sde_window samples its steps with sample.eta, which is 0: set sample.eta > 0")


def _check_gradient_from_sampling(config: RunConfig, algorithm) -> None:
    """What `train.gradient_from_sampling` needs (ddpo.core.engine.onpolicy); LoRA is checked when the model loads."""
    name = "train.gradient_from_sampling=true"
    on_policy = algorithm.on_policy_samples(config)
    if not on_policy:
        raise UsageError(f"{name}: algorithm '{algorithm.name}' with these options takes no gradient from "
                         "sampling; valid: ddpo-sf, ddpo-is with kl_weight=0, grpo with kl_beta=0 and "
                         "drop_zero_advantages=false")
    if on_policy % config.sample.batch_size:
        raise UsageError(f"{name}: the {on_policy} on-policy samples of algorithm '{algorithm.name}' (train.batch_size"
                         f" x train.grad_accum) must fill whole sampling batches of sample.batch_size="
                         f"{config.sample.batch_size}")
    if config.train.timestep_fraction != 1:
        raise UsageError(f"{name} trains every denoising step; set train.timestep_fraction=1 (got "
                         f"{config.train.timestep_fraction})")
    if config.mixed_precision == "fp16":
        raise UsageError(f"{name} does not run with fp16's loss scaling; use mixed_precision=bf16 or no")
    precision = config.model.options().get("sample_precision", "same")
    if precision != "same":
        raise UsageError(f"{name} samples with the training pass's precision; set model.sample_precision=same "
                         f"(got {precision})")
