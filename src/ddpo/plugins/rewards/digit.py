"""Rewards from the digit classifier shipped with ddpo (trained by scripts/train_digits.py on a training split
of scikit-learn's digits): `digit`, the probability of a target digit, and `legibility`, the highest digit
probability (how surely the image reads as some digit). The classifier has an 11th class, "not a digit", for
blanks, blobs and noise, so such images score near 0 on both."""

from __future__ import annotations

import pydantic

import ddpo


class _ClassifierReward(ddpo.Reward):
    def load(self, device):
        from ddpo.plugins.rewards.digit_classifier import load_digit_classifier

        self.classifier = load_digit_classifier(device)

    def digit_probabilities(self, images):
        """(B, 10) probabilities of the digits 0-9 for images (B, 3, H, W) in [0, 1]."""
        from ddpo.plugins.rewards.digit_classifier import NUM_DIGITS, digit_probabilities

        return digit_probabilities(self.classifier, images)[:, :NUM_DIGITS]


class Digit(_ClassifierReward):
    """Probability that the shipped digit classifier reads the image as `target` (0-9; default 0)."""

    name = "digit"

    class Options(ddpo.Options):
        target: int = pydantic.Field(0, ge=0, le=9)
        """The digit to reward."""

    def __call__(self, images, prompts, metadata):
        return self.digit_probabilities(images)[:, self.options.target]


class Legibility(_ClassifierReward):
    """Highest digit probability of the shipped digit classifier: rewards images that read as a clear digit."""

    name = "legibility"

    def __call__(self, images, prompts, metadata):
        return self.digit_probabilities(images).max(dim=1).values


@ddpo.hookimpl
def register_rewards(register):
    register(Digit)
    register(Legibility)
