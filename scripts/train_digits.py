"""Train the assets of the embedded default demo: a tiny digits DDPM and a digit classifier.

Reproduces, from scratch and offline on a CPU:

* ``<out>/digit_classifier.safetensors``: CNN from ``ddpo.plugins.rewards.digit_classifier``,
  trained on a stratified 80/20 split of scikit-learn's 8x8 digits upscaled to 16x16;
* ``<out>/digits/``: an unconditional ``DDPMPipeline`` (UNet2DModel + DDPMScheduler) on the
  same digits as 16x16 RGB images in [-1, 1].

It then runs the quality gate the project tests: samples drawn with stochastic DDIM
(eta=1, 20 steps) must cover all ten digits with confident classifier predictions.
Exit status is non-zero if the classifier or the gate misses its threshold.

    python scripts/train_digits.py --out src/ddpo/assets

scikit-learn is a dev dependency used only here, never by the package at run time.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel
from safetensors.torch import save_file
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

REPO_ROOT = Path(__file__).resolve().parents[1]
CLASSIFIER_MODULE = REPO_ROOT / "src" / "ddpo" / "plugins" / "rewards" / "digit_classifier.py"

IMAGE_SIZE = 16
MIN_ACCURACY = 0.97
MIN_MEAN_MAX_PROB = 0.6
# Not part of the project's test, but the RL demo starts each target digit from ~10%.
CLASS_FRACTION_RANGE = (0.03, 0.25)

UNET_CONFIG = dict(
    sample_size=IMAGE_SIZE,
    in_channels=3,
    out_channels=3,
    layers_per_block=1,
    block_out_channels=(16, 32, 32),
    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
)


def load_classifier_module():
    """Import digit_classifier.py by path, so the script works without installing the package."""
    spec = importlib.util.spec_from_file_location("ddpo_digit_classifier", CLASSIFIER_MODULE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_digit_images() -> tuple[torch.Tensor, torch.Tensor]:
    """Return sklearn digits as (N, 1, 16, 16) floats in [0, 1] (bilinear upscale of value/16) and labels."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return images, torch.tensor(digits.target, dtype=torch.long)


# --------------------------------------------------------------------------- classifier


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mild jitter (affine, blur, contrast, noise) so the classifier also judges imperfect samples."""
    n = images.shape[0]

    def uniform(low, high):
        return torch.rand(n, generator=generator) * (high - low) + low

    angle = uniform(-12, 12) * math.pi / 180
    scale = uniform(0.9, 1.1)
    shift = uniform(-1.5, 1.5), uniform(-1.5, 1.5)  # pixels
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [
            torch.stack([cos, -sin, shift[0] * 2 / IMAGE_SIZE], dim=1),
            torch.stack([sin, cos, shift[1] * 2 / IMAGE_SIZE], dim=1),
        ],
        dim=1,
    )
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    blurred = F.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)
    blur = (torch.rand(n, generator=generator) < 0.3).float() * uniform(0.3, 1.0)
    images = torch.lerp(images, blurred, blur.view(n, 1, 1, 1))

    contrast, brightness = uniform(0.7, 1.2), uniform(-0.1, 0.1)
    images = images * contrast.view(n, 1, 1, 1) + brightness.view(n, 1, 1, 1)
    noise_std = uniform(0.0, 0.12).view(n, 1, 1, 1)
    images = images + noise_std * torch.randn(images.shape, generator=generator)
    return images.clamp(0.0, 1.0)


def non_digits(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Images that are no digit (flat fields, random blobs, pixel-shuffled digits), one per input.

    Trained as the classifier's 11th class, "not a digit", they get no probability for any
    digit, so an RL fine-tune cannot gain reward by drawing blanks or noise.
    """
    n = images.shape[0]
    flat = torch.rand(n, 1, 1, 1, generator=generator) * 0.5 * torch.ones_like(images)
    blobs = torch.rand(n, 1, 8, 8, generator=generator) ** 2
    blobs = F.interpolate(blobs, size=images.shape[-2:], mode="bilinear", align_corners=False)
    shuffled = images.flatten(1)[:, torch.randperm(images[0].numel(), generator=generator)].view_as(images)
    kind = torch.randint(3, (n, 1, 1, 1), generator=generator)
    return torch.where(kind == 0, flat, torch.where(kind == 1, blobs, shuffled))


@torch.no_grad()
def accuracy(model, dc, images, labels) -> float:
    model.eval()
    logits = model(dc.preprocess(images.repeat(1, 3, 1, 1)))
    return (logits.argmax(dim=1) == labels).float().mean().item()


def train_classifier(dc, images, labels, args) -> tuple[torch.nn.Module, float]:
    idx_train, idx_test = train_test_split(
        np.arange(len(labels)), test_size=0.2, stratify=labels.numpy(), random_state=args.seed
    )
    x_train, y_train = images[idx_train], labels[idx_train]
    x_test, y_test = images[idx_test], labels[idx_test]

    generator = torch.Generator().manual_seed(args.seed)
    model = dc.build_digit_classifier()
    steps_per_epoch = math.ceil(len(y_train) / args.classifier_batch_size)
    total_steps = args.classifier_epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=total_steps)
    for epoch in range(args.classifier_epochs):
        model.train()
        total_loss = 0.0
        order = torch.randperm(len(y_train), generator=generator)
        for start in range(0, len(order), args.classifier_batch_size):
            batch = order[start : start + args.classifier_batch_size]
            digits = augment(x_train[batch], generator)
            outliers = augment(non_digits(x_train[batch[: len(batch) // 4]], generator), generator)
            logits = model(dc.preprocess(torch.cat([digits, outliers]).repeat(1, 3, 1, 1)))
            digit_loss = F.cross_entropy(logits[: len(batch)], y_train[batch])
            not_a_digit = torch.full((len(outliers),), dc.NOT_A_DIGIT, dtype=torch.long)
            outlier_loss = F.cross_entropy(logits[len(batch) :], not_a_digit)
            loss = digit_loss + 0.5 * outlier_loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += digit_loss.item() * len(batch)
        if (epoch + 1) % 10 == 0 or epoch + 1 == args.classifier_epochs:
            print(
                f"  classifier epoch {epoch + 1}/{args.classifier_epochs} digit loss {total_loss / len(y_train):.4f} "
                f"held-out acc {accuracy(model, dc, x_test, y_test):.4f}",
                flush=True,
            )
    model.eval()
    return model, accuracy(model, dc, x_test, y_test)


# --------------------------------------------------------------------------- DDPM


def make_ddpm_scheduler(beta_schedule: str) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=1000, beta_schedule=beta_schedule, prediction_type="epsilon", clip_sample=True
    )


def train_ddpm(images: torch.Tensor, args) -> tuple[UNet2DModel, DDPMScheduler]:
    """Plain epsilon-prediction DDPM training; returns the EMA weights, which sample cleaner."""
    data = images.repeat(1, 3, 1, 1) * 2.0 - 1.0
    generator = torch.Generator().manual_seed(args.seed + 1)
    torch.manual_seed(args.seed + 1)  # weight init independent of the classifier phase
    unet = UNet2DModel(**UNET_CONFIG)
    ema = copy.deepcopy(unet).requires_grad_(False)
    noise_scheduler = make_ddpm_scheduler(args.beta_schedule)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    warmup = min(500, args.ddpm_steps // 10)

    def lr_factor(step):  # linear warm-up, then cosine decay to 10%
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, args.ddpm_steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    started, running = time.time(), 0.0
    for step in range(args.ddpm_steps):
        unet.train()
        x0 = data[torch.randint(len(data), (args.batch_size,), generator=generator)]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(x0),), generator=generator)
        pred = unet(noise_scheduler.add_noise(x0, noise, t), t).sample
        loss = F.mse_loss(pred, noise)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        lr_schedule.step()

        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), unet.parameters()):
                p_ema.lerp_(p, 1 - decay)

        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if (step + 1) % 500 == 0 or step + 1 == args.ddpm_steps:
            elapsed = time.time() - started
            print(
                f"  ddpm step {step + 1}/{args.ddpm_steps} loss {running:.4f} "
                f"lr {lr_schedule.get_last_lr()[0]:.2e} {elapsed / 60:.1f} min",
                flush=True,
            )
    return ema.eval(), noise_scheduler


@torch.no_grad()
def forward_ms(unet: UNet2DModel, batch_size: int = 64, repeats: int = 10) -> float:
    """Best-of-N forward time; the minimum is the least disturbed by other load on the machine."""
    size = unet.config.sample_size
    x = torch.randn(batch_size, unet.config.in_channels, size, size)
    t = torch.randint(0, 1000, (batch_size,))
    times = []
    for _ in range(repeats + 2):
        start = time.perf_counter()
        unet(x, t)
        times.append(time.perf_counter() - start)
    return 1000 * min(times[2:])


@torch.no_grad()
def sample_images(unet, scheduler_config, num_samples: int, seed: int, steps: int = 20, eta: float = 1.0):
    """Sample like the project does: DDIM built from the saved DDPM config, from N(0, I); returns [0, 1]."""
    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    x = torch.randn((num_samples, unet.config.in_channels, size, size), generator=generator)
    for t in scheduler.timesteps:
        eps = unet(x, t).sample
        x = scheduler.step(eps, t, x, eta=eta, generator=generator).prev_sample
    return ((x + 1) / 2).clamp(0, 1)


def quality_gate(unet, scheduler_config, classifier, dc, num_samples: int, seed: int) -> bool:
    probs = dc.digit_probabilities(classifier, sample_images(unet, scheduler_config, num_samples, seed))
    max_prob, predicted = probs[:, : dc.NUM_DIGITS].max(dim=1)  # how surely each sample reads as some digit
    counts = torch.bincount(predicted, minlength=dc.NUM_DIGITS)
    fractions = counts.float() / num_samples
    mean_max = max_prob.mean().item()
    low, high = CLASS_FRACTION_RANGE
    passed = bool(fractions.min() > 0) and mean_max >= MIN_MEAN_MAX_PROB
    balanced = bool(fractions.min() >= low and fractions.max() <= high)
    hist = " ".join(f"{k}:{c}" for k, c in enumerate(counts.tolist()))
    print(
        f"  gate seed {seed}: classes [{hist}] mean max-prob {mean_max:.3f} "
        f"-> {'PASS' if passed and balanced else 'FAIL'}"
        + ("" if balanced else f" (class fractions outside {low:.0%}-{high:.0%})"),
        flush=True,
    )
    return passed and balanced


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "src" / "ddpo" / "assets")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classifier-epochs", type=int, default=60)
    parser.add_argument("--classifier-batch-size", type=int, default=64)
    parser.add_argument("--ddpm-steps", type=int, default=8000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--beta-schedule", choices=["linear", "squaredcos_cap_v2"], default="linear")
    parser.add_argument("--gate-samples", type=int, default=256)
    parser.add_argument("--gate-seeds", type=int, nargs="+", default=[0, 1, 2])
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    dc = load_classifier_module()
    seed_everything(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, out={args.out}", flush=True)
    images, labels = load_digit_images()
    timings = {}
    t_start = time.time()

    print("[1/3] classifier", flush=True)
    t0 = time.time()
    classifier, acc = train_classifier(dc, images, labels, args)
    classifier_path = args.out / "digit_classifier.safetensors"
    save_file({k: v.contiguous() for k, v in classifier.state_dict().items()}, str(classifier_path))
    timings["classifier"] = time.time() - t0
    print(f"  held-out accuracy {acc:.4f} (min {MIN_ACCURACY}); saved {classifier_path}", flush=True)

    print("[2/3] DDPM", flush=True)
    t0 = time.time()
    unet, noise_scheduler = train_ddpm(images, args)
    print(
        f"  UNet parameters: {sum(p.numel() for p in unet.parameters()):,}; "
        f"forward on batch 64: {forward_ms(unet):.1f} ms (best of 10)",
        flush=True,
    )
    pipeline_dir = args.out / "digits"
    DDPMPipeline(unet=unet, scheduler=noise_scheduler).save_pretrained(pipeline_dir, safe_serialization=True)
    timings["ddpm"] = time.time() - t0
    print(f"  saved {pipeline_dir}", flush=True)

    print("[3/3] quality gate (DDIM eta=1.0, 20 steps), reloaded from disk", flush=True)
    t0 = time.time()
    pipeline = DDPMPipeline.from_pretrained(pipeline_dir)
    classifier = dc.load_digit_classifier(weights_path=classifier_path)
    gate_ok = all(
        [
            quality_gate(pipeline.unet.eval(), pipeline.scheduler.config, classifier, dc, args.gate_samples, seed)
            for seed in args.gate_seeds
        ]
    )
    timings["gate"] = time.time() - t0
    timings["total"] = time.time() - t_start

    print("timings: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items()), flush=True)
    ok = acc >= MIN_ACCURACY and gate_ok
    print("OK" if ok else "FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
