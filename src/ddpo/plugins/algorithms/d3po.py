"""D3PO: Using Human Feedback to Fine-tune Diffusion Models without Any Reward Model (Yang et al., CVPR 2024,
arXiv 2311.13231).

Two trajectories share a prompt and an initial noise x_T (the rollout's groups of 2, rows 2j and 2j+1) and
differ only through the sampler's noise. The one with the higher reward is preferred (w), the other is not
(l); a tie says nothing and is masked out. With `group_size` k > 2, k trajectories share x_T and every pair of
the group is one such pair (the official human-feedback pipeline samples 7 images per prompt and trains all 21
pairs, scripts/train.py); `tie_margin` makes rewards closer than it a tie. Every denoising step of the pair is then a one-step DPO problem
with the trajectory's preference, against the frozen pretrained model p_ref (no reward model, no critic):

      rho_k = clamp(p_theta(x^k_{t-1} | x^k_t, c) / p_ref(x^k_{t-1} | x^k_t, c), 1 - eps, 1 + eps)
      L     = -log sigmoid(beta (log rho_w - log rho_l)),   beta = 0.1, eps = 0.1

The clamp (the paper's bound on the Q-values) stops the gradient of a member whose ratio has left
[1 - eps, 1 + eps]. L is averaged over the non-tied pairs of a minibatch (0 if all are tied; the micro-step
still counts, so optimizer steps stay on schedule). At initialisation p_theta = p_ref, so L = log 2.
Log-probabilities are per-element means (DESIGN.md §7), the scale beta and eps were tuned on.

The paper's recipe (the official code's config): SD 1.5 with LoRA, 20 DDIM steps, eta 1, guidance 5, lr 3e-5,
10 pairs per sampling batch x 2 batches per epoch, one pair per training minibatch (here train.batch_size=2:
our batches count trajectories, two per pair), every step of every pair trained, one optimizer step per pair.

Human labels instead of a reward: `ddpo pairs export --out DIR` samples pairs and writes them for people to
label (`pairs.jsonl`, `pair_NNNN.png`, the trajectories); `--set algorithm.labels=DIR/labels.jsonl` then trains
on the labelled pairs, every epoch, without sampling. A labels file holds one JSON object per line,
{"pair": ID, "preferred": 0 | 1 | "tie"} (0 = the left image); several lines for one pair are votes, and
the pair's rewards are the vote shares (1/0 for one vote, 0.5/0.5 for a tie).
"""

from __future__ import annotations

import json
from pathlib import Path

import pydantic

import ddpo
from ddpo.core.configuration.errors import UsageError

EXPORT_FILE = "export.json"
"""The export's settings and prompts: {"model": {"name", "options"}, "sample": {...}, "pairs": [...], ...}."""
TRAJECTORY_FILE = "trajectories.safetensors"
"""The exported trajectories' tensors, pair p in rows 2p (left) and 2p+1 (right); prompt embeddings as
"prompt_embeds", or one "prompt_embeds.<key>" per entry of a model's dict of them (SD3, SDXL, FLUX)."""
PAIRS_FILE = "pairs.jsonl"
README_FILE = "README.txt"
SAMPLER_SETTINGS = ("num_steps", "eta", "guidance_scale")
"""The sampler settings an export records; a run that trains on it must use the same."""
PREFERENCE_REWARDS = {0: (1.0, 0.0), 1: (0.0, 1.0), "tie": (0.5, 0.5)}
"""One vote as the rewards of the (left, right) images."""


def flat_prompt_embeds(prompt_embeds) -> dict:
    """A trajectory's prompt embeddings as the export's flat tensors (see `TRAJECTORY_FILE`); {} for none."""
    if prompt_embeds is None:
        return {}
    if isinstance(prompt_embeds, dict):
        return {f"prompt_embeds.{key}": value for key, value in prompt_embeds.items()}
    return {"prompt_embeds": prompt_embeds}


def stored_prompt_embeds(tensors: dict, rows):
    """The prompt embeddings of `rows` from the export's flat tensors, as the model made them (a tensor, a dict of
    tensors, or None)."""
    if "prompt_embeds" in tensors:
        return tensors["prompt_embeds"][rows]
    parts = {name.removeprefix("prompt_embeds."): tensor[rows] for name, tensor in tensors.items()
             if name.startswith("prompt_embeds.")}
    return parts or None


def export_directory(labels: str, pairs_dir: str) -> Path:
    """The export the labels refer to: `pairs_dir`, or the labels file's own directory."""
    return Path(pairs_dir) if pairs_dir else Path(labels).parent


def read_export(directory: Path) -> dict:
    """The export's `export.json`; ValueError if there is none."""
    path = directory / EXPORT_FILE
    if not path.is_file() or not (directory / TRAJECTORY_FILE).is_file():
        raise ValueError(f"no pair export in {directory} ({EXPORT_FILE} and {TRAJECTORY_FILE} expected); make one "
                         f"with `ddpo pairs export --out DIR`, keep the labels file in DIR or set algorithm.pairs_dir")
    return json.loads(path.read_text())


def read_labels(path: Path, export: dict) -> dict[int, tuple[float, float]]:
    """Each labelled pair's (left, right) rewards: the share of votes for each image (a tie votes half each).
    ValueError, naming the line, for anything that is not a label of a pair in the export."""
    if not path.is_file():
        raise ValueError(f"labels file not found: {path}")
    known = {entry["pair"] for entry in export["pairs"]}
    votes: dict[int, list[tuple[float, float]]] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"labels file {path} line {number}"
        try:
            label = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f'{where} is not JSON; expected {{"pair": ID, "preferred": 0, 1 or "tie"}}') from None
        if not isinstance(label, dict) or not {"pair", "preferred"} <= set(label):
            raise ValueError(f'{where} must be an object with "pair" and "preferred", got {line.strip()}')
        pair, preferred = label["pair"], label["preferred"]
        if type(pair) is not int or pair not in known:
            raise ValueError(f"{where}: unknown pair id {pair!r}; the export in {path.parent} holds pairs "
                             f"{min(known)}-{max(known)}")
        if not (preferred == "tie" or type(preferred) is int and preferred in PREFERENCE_REWARDS):
            raise ValueError(f'{where}: "preferred" must be 0 (left), 1 (right) or "tie", got {preferred!r}')
        votes.setdefault(pair, []).append(PREFERENCE_REWARDS[preferred])
    if not votes:
        raise ValueError(f"labels file {path} holds no labels")
    return {pair: (sum(left for left, _ in pair_votes) / len(pair_votes),
                   sum(right for _, right in pair_votes) / len(pair_votes))
            for pair, pair_votes in sorted(votes.items())}


def preference_pairs(rewards, group_size: int = 2, tie_margin: float = 0.0):
    """Every pair (a, b), a < b, of each group of `group_size` consecutive rows: `(first, second, direction)`,
    each (P,), direction +1 where a's reward is the higher, -1 where b's is, 0 for a tie (rewards less than
    `tie_margin` apart, or equal). Pairs (group_size 2) are rows (0, 1), (2, 3), ..."""
    import torch

    first, second = torch.triu_indices(group_size, group_size, 1, device=rewards.device)
    starts = torch.arange(0, len(rewards), group_size, device=rewards.device)[:, None]
    first, second = (starts + first).flatten(), (starts + second).flatten()
    gap = rewards[first] - rewards[second]
    return first, second, gap.sign() * (gap.abs() >= tie_margin)


def net_preferences(rewards, group_size: int = 2, tie_margin: float = 0.0):
    """(B,) how many members of its group each trajectory is preferred to, minus how many are preferred to it
    (for pairs: +1 preferred, -1 not, 0 tie)."""
    first, second, direction = preference_pairs(rewards, group_size, tie_margin)
    return (direction.new_zeros(len(rewards)).index_add_(0, first, direction).index_add_(0, second, -direction))


def preference_loss(log_prob, ref_log_prob, pairs, beta: float, eps: float):
    """D3PO's loss for (B,) transitions and the `preference_pairs` among them.

    Returns `(loss, margin, valid, clamped)`: the mean over non-tied pairs (0, still differentiable, if none),
    the (P,) implicit reward margins beta (log ratio_w - log ratio_l) from the unclamped ratios (positive: the
    policy already prefers the preferred member), the (P,) mask of non-tied pairs, and the (B,) mask of the
    transitions whose ratio is clamped (they give no gradient).
    """
    import math

    import torch.nn.functional as F

    first, second, direction = pairs
    log_ratio = log_prob - ref_log_prob
    clamped = log_ratio.clamp(math.log(1 - eps), math.log(1 + eps))  # = log clamp(rho), without exp overflowing
    valid = direction != 0
    pair_loss = -F.logsigmoid(beta * direction * (clamped[first] - clamped[second]))
    loss = (pair_loss * valid).sum() / valid.sum().clamp(min=1)
    margin = (beta * direction * (log_ratio[first] - log_ratio[second])).detach()
    return loss, margin, valid, (clamped != log_ratio).detach()


class D3PO(ddpo.Algorithm):
    """D3PO: DPO on every denoising step of reward- or human-labelled pairs, against the pretrained model."""

    name = "d3po"
    needs_reference = True
    keeps_groups_together = True
    run_defaults = {
        "sample": {"num_steps": 20, "eta": 1.0, "guidance_scale": 5.0, "batch_size": 20, "batches_per_epoch": 2},
        "train": {"learning_rate": 3e-5, "batch_size": 2, "grad_accum": 1, "timestep_fraction": 1.0},
    }
    # On the digits demo (32 pairs per epoch, the model's own leading timesteps: with trailing ones every lr tried
    # left the reward below the untrained model's). Train batch 8 (4 pairs), so 8 optimizer steps an epoch: with
    # 32 (2 steps) target 7 seed 0 did not move in 8 epochs (-0.01). Batch 8 alone rose 0.13-0.76 on targets 3/7/8
    # x seeds 0/1 but took seed 2 off the digits (legibility 0.04-0.43) with every lr, tie margin and group tried:
    # the last steps (sigma down to 0.01) give the largest, noisiest gradients. Training the first 18 of 20 steps
    # and a KL weight of 0.01 to the pretrained model: rises 0.15-0.52 on targets 3/7/8 x seeds 0-2, legibility
    # >= 0.89 (either change alone: (8, 2) lost its digits, or (3, 0) stopped learning; docs/algorithms/d3po.md).
    model_run_defaults = {
        "digits": {
            "model": {"name": "digits", "timestep_spacing": "pipeline"},
            "sample": {"batch_size": 32, "batches_per_epoch": 2, "guidance_scale": 1.0},
            "train": {"learning_rate": 3e-4, "batch_size": 8, "grad_accum": 1, "timestep_fraction": 0.9,
                      "timestep_selection": "first"},
            "algorithm": {"name": "d3po", "kl_weight": 0.01},
        },
    }

    class Options(ddpo.Options):
        beta: float = pydantic.Field(0.1, gt=0)
        """DPO temperature on the log-ratio margin (paper: 0.1)."""
        eps: float = pydantic.Field(0.1, gt=0, lt=1)
        """Clamp of the ratio to the pretrained model, [1 - eps, 1 + eps] (paper: 0.1)."""
        group_size: int = pydantic.Field(2, ge=2)
        """Images sampled per prompt from one initial noise; every pair of a group is trained on. 2: the
        reward-model script's pairs; the official human-feedback pipeline samples 7 and trains all 21 pairs.
        Labelled pairs (`labels`) are groups of 2 whatever this says."""
        tie_margin: float = pydantic.Field(0.0, ge=0)
        """Rewards less than this apart are a tie, not trained on. 0: only equal rewards (the official code's
        `compare`); a labeller's "no preference" between two images that are both bad at the task."""
        kl_weight: float = pydantic.Field(0.0, ge=0)
        """Weight of the KL to the pretrained model added to the loss (not in D3PO: 0, the paper's loss): the exact
        Gaussian KL of each trained step, mean over elements of (mu - mu_ref)^2 / (2 sigma^2) (as ddpo-is's
        `kl_weight`). The clamp stops the gradient of a transition that left [1 - eps, 1 + eps], but does not pull
        it back; this does."""
        pairs_dir: str = ""
        """Directory of a `ddpo pairs export` the labels refer to; default: the labels file's directory."""
        labels: str = pydantic.Field("", validate_default=True)
        """JSONL file of human labels {"pair": ID, "preferred": 0|1|"tie"}: train on those pairs instead of
        sampling; empty: sample pairs and prefer the higher reward."""

        @pydantic.field_validator("pairs_dir")
        @classmethod
        def _absolute_pairs_dir(cls, pairs_dir: str) -> str:
            return str(Path(pairs_dir).resolve()) if pairs_dir else ""

        @pydantic.field_validator("labels")
        @classmethod
        def _labels_of_an_export(cls, labels: str, info: pydantic.ValidationInfo) -> str:
            """Read the labels and their export now, so that a bad file stops the run before it starts."""
            pairs_dir = info.data.get("pairs_dir", "")
            if not labels:
                if pairs_dir:
                    raise ValueError("algorithm.pairs_dir is only read with algorithm.labels=FILE")
                return ""
            path = Path(labels).resolve()
            read_labels(path, read_export(export_directory(str(path), pairs_dir)))
            return str(path)

    def __init__(self, options=None):
        super().__init__(options)
        self.labelled = None
        """(trajectory, images) of the human-labelled pairs this process trains on, when there are labels."""

    def group_size(self) -> int:
        return 2 if self.options.labels else self.options.group_size

    def setup(self, run):
        if self.options.labels:
            self.labelled = self._load_labelled_pairs(run)

    def _load_labelled_pairs(self, run):
        """The labelled pairs of the export (this process's share), checked against the run's settings."""
        import torch
        from safetensors.torch import load_file

        from ddpo.core.plugin_api.schema import Trajectory

        config, accelerator = run.config, run.accelerator
        directory = export_directory(self.options.labels, self.options.pairs_dir)
        export = read_export(directory)
        exported = {"model": export["model"]["name"],
                    "model.pretrained": export["model"]["options"].get("pretrained"),
                    **{f"sample.{key}": export["sample"][key] for key in SAMPLER_SETTINGS}}
        current = {"model": config.model.name, "model.pretrained": config.model.options().get("pretrained"),
                   **{f"sample.{key}": getattr(config.sample, key) for key in SAMPLER_SETTINGS}}
        for key, value in exported.items():
            if current[key] != value:
                raise UsageError(f"the pairs in {directory} were sampled with {key}={value}, but this run has "
                                 f"{key}={current[key]}; train with the export's settings (see {EXPORT_FILE})")
        rewards = read_labels(Path(self.options.labels), export)
        trajectories = 2 * len(rewards)
        per_step = config.train.batch_size * config.train.grad_accum * accelerator.num_processes
        if trajectories % per_step:
            raise UsageError(f"{len(rewards)} labelled pairs ({trajectories} trajectories) do not fill whole "
                             f"optimizer steps: train.batch_size x train.grad_accum x processes = {per_step} must "
                             f"divide {trajectories} (e.g. --set train.batch_size=2 --set train.grad_accum=1)")

        tensors = load_file(str(directory / TRAJECTORY_FILE))
        prompts = {entry["pair"]: entry for entry in export["pairs"]}
        pairs = list(rewards)[accelerator.process_index::accelerator.num_processes]
        rows = torch.tensor([2 * pair + member for pair in pairs for member in (0, 1)])
        device = accelerator.device
        trajectory = Trajectory(
            latents=tensors["latents"][rows], timesteps=tensors["timesteps"][rows],
            log_probs=tensors["log_probs"][rows], policy_steps=tensors["policy_steps"][rows],
            prev_timesteps=tensors["prev_timesteps"][rows], group_ids=tensors["group_ids"][rows],
            prompt_embeds=stored_prompt_embeds(tensors, rows),
            prompts=[prompts[pair]["prompt"] for pair in pairs for _ in (0, 1)],
            prompt_metadata=[prompts[pair]["metadata"] for pair in pairs for _ in (0, 1)],
            rewards=torch.tensor([reward for pair in pairs for reward in rewards[pair]]),
        ).to(device)
        with torch.no_grad():
            images = run.model.decode(trajectory.latents[:, -1]).cpu()
        return trajectory, images

    def offline_trajectories(self, run):
        """With labels: the labelled pairs, every epoch (the training order shuffles them)."""
        return self.labelled

    def compute_advantages(self, run, trajectory):
        """`net_preferences` (for pairs +1 preferred, -1 not, 0 tie): D3PO needs no reward normalisation."""
        return net_preferences(trajectory.rewards, self.group_size(), self.options.tie_margin)

    def update(self, run, trajectory):
        import torch

        from ddpo.core.math.policy import EpochStatistics, kl_to_reference, policy_update

        group_size, tie_margin = self.group_size(), self.options.tie_margin
        if trajectory.group_ids is not None:
            groups = trajectory.group_ids.view(-1, group_size)
            if not torch.equal(groups, groups[:, :1].expand_as(groups)):
                raise ValueError(f"d3po trains on groups of {group_size} consecutive rows with one group id; sample "
                                 f"with group_size={group_size}")
        judged = preferred = 0
        margins = 0.0

        options, statistics = self.options, EpochStatistics()

        def loss(transitions, step):
            nonlocal judged, preferred, margins
            pairs = preference_pairs(transitions.rewards, group_size, tie_margin)
            reference = step.reference()
            policy_loss, margin, valid, clamped = preference_loss(step.log_prob, reference.log_prob, pairs,
                                                                  options.beta, options.eps)
            judged += int(valid.sum())
            preferred += int((margin[valid] > 0).sum())
            margins += float(margin[valid].sum())
            total = policy_loss
            if options.kl_weight > 0:
                kl = kl_to_reference(run.model, transitions, step.mean, step.std, run.config.sample, statistics,
                                     reference_mean=reference.mean)
                total = policy_loss + options.kl_weight * kl
            return total, {"loss/policy": policy_loss.item(), "loss/total": total.item(),
                           "d3po/clamped_fraction": clamped.float().mean().item()}

        summary = policy_update(run, trajectory, loss, statistics=statistics, group_size=group_size,
                                reference=("log_prob", "mean") if options.kl_weight > 0 else ("log_prob",))
        return {**summary,
                "d3po/pairs": float((preference_pairs(trajectory.rewards, group_size, tie_margin)[2] != 0).sum()),
                "d3po/preference_accuracy": preferred / judged if judged else float("nan"),
                "d3po/margin": margins / judged if judged else float("nan")}


@ddpo.hookimpl
def register_algorithms(register):
    register(D3PO)
