"""The `ocr` reward: Flow-GRPO's formula against a hand-written edit distance, and the real recogniser (RapidOCR's
PP-OCRv4 networks, shipped in its wheel) reading text that PIL renders."""

import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from ddpo.core.plugins import get_registry
from ddpo.core.rollout import score
from ddpo.plugins.rewards.ocr import Ocr, TextSigns, target_text, text_reward
from ddpo.testing import check_reward


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance by the textbook dynamic programme (insert, delete, substitute: cost 1 each)."""
    row = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, char_b in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (char_a != char_b))
    return row[-1]


def flow_grpo_reward(recognised: str, target: str) -> float:
    """Flow-GRPO's reward written out from its description (flow_grpo/ocr.py:46-60), with the DP above."""
    recognised, target = recognised.replace(" ", "").lower(), target.replace(" ", "").lower()
    distance = 0 if target in recognised else min(edit_distance(recognised, target), len(target))
    return 1 - distance / len(target)


@pytest.mark.parametrize("recognised, target", [
    ("HELLO", "hello"), ("Hello World", "helloworld"), ("xxhelloyy", "Hello"), ("helo", "hello"),
    ("jello", "hello"), ("", "open"), ("completely unrelated words", "cafe"), ("C A F E", "cafe"), ("ehllo", "hello"),
])
def test_reward_is_flow_grpos_capped_normalised_edit_distance(recognised, target):
    assert text_reward(recognised, target) == pytest.approx(flow_grpo_reward(recognised, target), abs=1e-12)


def test_reward_values_by_hand():
    assert text_reward("HELO", "HELLO") == pytest.approx(0.8)  # one insertion in five letters
    assert text_reward("a long unrelated text", "OPEN") == 0.0  # capped at len(target)
    assert text_reward("The shop is OPEN now", "open") == 1.0  # the target inside the text read
    assert text_reward("", "") == 1.0 and text_reward("x", "") == 0.0


def test_the_target_is_the_metadata_text_else_the_quoted_span_else_the_prompt():
    assert target_text('a sign that reads "OPEN" at night', {}) == "OPEN"
    assert target_text('a sign "A" and "B"', {}) == "A"
    assert target_text('a sign that reads "OPEN"', {"text": "CLOSED"}) == "CLOSED"
    assert target_text("hello world", {}) == "hello world"
    assert target_text('an unclosed "quote', {}) == 'an unclosed "quote'


def render(text: str, size: int = 256) -> torch.Tensor:
    """Black `text` on white, (3, size, size) in [0, 1]."""
    image = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(image).text((12, size // 2 - 20), text, fill="black", font=ImageFont.load_default(size=36))
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)


@pytest.fixture(scope="module")
def ocr():
    reward = get_registry().get("rewards", "ocr")(Ocr.Options())
    reward.load(torch.device("cpu"))
    return reward


def test_the_recogniser_reads_rendered_text_and_scores_it_against_the_prompt(ocr):
    images = torch.stack([render("HELLO"), render("HELLO"), render("HELO"), render(""), render("OPEN")])
    prompts = ['a sign that reads "HELLO"', 'a sign that reads "WORLD"', 'a sign that reads "HELLO"',
               'a sign that reads "HELLO"', "a cafe sign"]
    metadata = [{}, {}, {}, {}, {"text": "open"}]
    rewards = score(ocr, images, prompts, metadata).tolist()
    assert rewards[0] == 1.0 and rewards[4] == 1.0  # read exactly (case and spaces aside)
    assert rewards[2] == pytest.approx(0.8)  # HELO for HELLO: one letter missing
    assert rewards[3] == 0.0  # a blank image reads as nothing
    assert rewards[1] == pytest.approx(flow_grpo_reward("HELLO", "WORLD"))  # 0.2: only the L matches in place


def test_ocr_meets_the_reward_contract():
    rewards = check_reward(Ocr, {"min_confidence": 0.5}, batch_size=2, image_size=64)
    assert rewards.tolist() == [0.0, 0.0]  # noise holds no text of "a cat"


def test_text_signs_ask_for_a_quoted_word_and_carry_it_in_the_metadata():
    rng = random.Random(0)
    for _ in range(20):
        prompt, metadata = TextSigns().sample(rng)
        assert target_text(prompt, {}) == metadata["text"] and f'"{metadata["text"]}"' in prompt
