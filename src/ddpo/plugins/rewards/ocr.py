"""`ocr`: does the image show the text the prompt asks for? Flow-GRPO's text-rendering reward (Liu et al., 2025,
arXiv 2505.05470; its OCR task takes SD3.5-M from 0.59 to 0.92).

The text asked for is the prompt's first double-quoted span (`A sign that reads "OPEN"` asks for OPEN), as
flow_grpo/ocr.py:31 takes it; a prompt's metadata `{"text": ...}` overrides it, and a prompt without quotes asks
for the whole prompt. A recogniser reads every line of text in the image; the lines it is sure of (confidence at
least `min_confidence`) are joined. Both strings lose their spaces and case, then (ocr.py:44-60)

      d      = 0                        if the target occurs in the recognised text,
               Levenshtein(recognised, target)   otherwise, at most len(target)
      reward = 1 - d / len(target)      in [0, 1]; 1 when the text is there, 0 when nothing of it is.

An empty target (a prompt `""`) scores 1 when no text is recognised and 0 otherwise.

The recogniser: Flow-GRPO runs PaddleOCR's English PP-OCR models (`lang="en"`, no angle classifier, ocr.py:14).
Here it is RapidOCR (`rapidocr-onnxruntime`, Apache-2.0), the same PP-OCRv4 detection and recognition networks
exported to ONNX and shipped inside the wheel, so the reward works offline with no download; its recognition model
is PP-OCRv4's Chinese-and-English one, which reads Latin text as the English one does but may also read CJK
characters. `min_confidence` 0.5 is PaddleOCR's default `drop_score`, which Flow-GRPO keeps. The edit distance is
rapidfuzz's. Install both with `pip install 'ddpo[ocr]'`.

The prompt set `text_signs` asks for short words on signs, shirts and cakes (the text and where it is written
in the metadata), for trying the reward on any model.
"""

from __future__ import annotations

import random

import pydantic

import ddpo
from ddpo.core.errors import UsageError

SIGN_WORDS = (
    "OPEN CLOSED EXIT SALE CAFE BAKERY HOTEL TAXI STOP HELLO WELCOME LOVE HOPE PEACE DREAM RELAX SMILE ENJOY "
    "COFFEE PIZZA BOOKS MUSIC GARDEN BEACH FOREST RIVER STORM SUNNY HAPPY BRAVE"
).split()
SIGN_PLACES = ("a wooden sign that reads", "a neon sign saying", "a T-shirt printed with", "a birthday cake with",
               "a chalkboard with the word", "a street banner that says")


def target_text(prompt: str, metadata: dict) -> str:
    """The text `prompt` asks to be written: metadata["text"], else its first double-quoted span, else itself."""
    if "text" in metadata:
        return str(metadata["text"])
    quoted = prompt.split('"')
    return quoted[1] if len(quoted) > 2 else prompt


def text_reward(recognised: str, target: str) -> float:
    """Flow-GRPO's OCR reward of `recognised` text for `target`: 1 - capped edit distance / len(target), after
    both lose spaces and case (flow_grpo/ocr.py:46-60)."""
    from rapidfuzz.distance import Levenshtein

    recognised = recognised.replace(" ", "").lower()
    target = target.replace(" ", "").lower()
    if not target:
        return 0.0 if recognised else 1.0
    distance = 0 if target in recognised else min(Levenshtein.distance(recognised, target), len(target))
    return 1.0 - distance / len(target)


class Ocr(ddpo.Reward):
    """1 - normalised edit distance between the prompt's quoted text and the text read in the image (Flow-GRPO)."""

    name = "ocr"

    class Options(ddpo.Options):
        min_confidence: float = pydantic.Field(0.5, ge=0, le=1)
        """Recognised lines below this confidence are ignored (PaddleOCR's drop_score, as Flow-GRPO runs it)."""

    def load(self, device):
        import torch

        try:
            from rapidocr_onnxruntime import RapidOCR
        except ImportError as error:
            raise UsageError(f"the ocr reward needs rapidocr-onnxruntime and rapidfuzz ({error}); "
                             "pip install 'ddpo[ocr]'") from None
        threads = torch.get_num_threads()  # as many as torch may use, not every core
        self.engine = RapidOCR(use_cls=False, text_score=self.options.min_confidence,
                               intra_op_num_threads=threads, inter_op_num_threads=1)

    def read(self, image) -> str:
        """The text recognised in one PIL image: its confident lines joined, top to bottom as detected."""
        lines, _ = self.engine(image, use_cls=False)
        return "".join(text for _, text, _ in lines or [])

    def __call__(self, images, prompts, metadata):
        from PIL import Image

        pixels = (images.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        return [text_reward(self.read(Image.fromarray(array)), target_text(prompt, meta))
                for array, prompt, meta in zip(pixels, prompts, metadata, strict=True)]


class TextSigns(ddpo.PromptSet):
    """Short words written on signs, shirts and cakes ('a neon sign saying "OPEN"'), for the `ocr` reward."""

    name = "text_signs"

    def sample(self, rng: random.Random):
        word, place = rng.choice(SIGN_WORDS), rng.choice(SIGN_PLACES)
        return f'{place} "{word}"', {"text": word, "place": place}


@ddpo.hookimpl
def register_rewards(register):
    register(Ocr)


@ddpo.hookimpl
def register_prompts(register):
    register(TextSigns)
