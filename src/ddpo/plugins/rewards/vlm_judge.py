"""`vlm-judge`: a vision-language model is asked whether the image shows the prompt, and the reward is how sure
it is of "yes". One forward pass per batch, no generation.

The question (VQAScore's, Lin et al., 2024, "Evaluating Text-to-Visual Generation with Image-to-Text Generation",
arXiv 2404.01291) goes through the checkpoint's chat template with the image, ending where the assistant's
answer opens; the VLM's logits for that first answer token give

    P(w)   = softmax(logits)[w]                for each token w of the vocabulary
    P(yes) = sum of P(w) over the yes tokens   ("Yes", "yes", " Yes", " yes": the case and leading-space
    P(no)  = sum of P(w) over the no tokens     variants of the answer word that are one token)
    reward = P(yes) / (P(yes) + P(no))         in [0, 1]

VQAScore scores P("Yes") alone; dividing by P(yes) + P(no) keeps the judgement and drops the probability the
model puts on other first tokens ("The", "It", ...), which depends on the phrasing more than on the image. The
spelling variants are summed because which one opens the answer ("Yes", "yes", " Yes" after a template that ends
without a newline) depends on the model and template, not on the judgement; Qwen's tokenizer has all four as
single tokens. A variant that is several tokens is left out, so that a shared first piece cannot count for both
answers. The UnifiedReward judges (Wang et al., 2025, arXiv 2503.05236; their Qwen versions are fine-tuned
Qwen2.5-VL-Instruct) are read by generating a rated answer and parsing it; reading the yes/no probability instead
takes one forward pass and gives a score that moves smoothly with the image. Any Qwen2-VL or Qwen2.5-VL
checkpoint in transformers' format loads here, UnifiedReward's included.

Default VLM: `Qwen/Qwen2-VL-2B-Instruct`, a general instruct model, which a question ending "answer yes or no"
asks for the answer format this reward reads; the UnifiedReward checkpoints are fine-tuned to answer their own
judging prompts (scores, reasons), so a bare yes/no question is off their training distribution. At 2.2B
parameters it fits beside the diffusion model on one GPU. `Qwen/Qwen2-VL-7B-Instruct` or
`Qwen/Qwen2.5-VL-7B-Instruct` judge better (VQAScore found larger VLMs closer to human judgements) at about 4x
the memory.

Inputs are built from the checkpoint's tokenizer (its chat template) and image processor, joined as
`Qwen2VLProcessor` joins them: the image placeholder is repeated once per merged 28x28 patch. The processor itself
is not loaded because transformers 5 (5.25 at least) cannot build it without torchvision (for its video part),
which ddpo does not need otherwise. Images go to the image processor as tensors (B, 3, H, W) in [0, 1] with
`do_rescale=False`; it resizes each side to a multiple of 28 pixels with at most `max_pixels` pixels (512x512
gives 324 image tokens). With torchvision installed it does so on the tensors; without, transformers' PIL backend
resizes through an 8-bit image, as it would for a PIL input. Batched with left padding, so the last position of
every row is the one whose logits are read.

Cost: Qwen2-VL-2B-Instruct has about 2.2B parameters: 4.4 GB in float16 (8.8 GB in float32); the 7B models
about 8.3B, 16.6 GB in float16. Only the last position's logits are computed. Serve it from one GPU to every
training process with `ddpo serve-reward vlm-judge` and the `remote` reward.
"""

from __future__ import annotations

import inspect
from typing import Literal

import pydantic

import ddpo
from ddpo.core.configuration.errors import UsageError

QWEN_VL_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
"""transformers' model types of the checkpoints this reward reads (their image-token layout is Qwen2-VL's)."""
DEFAULT_QUESTION = 'Does this figure show "{prompt}"? Please answer yes or no.'
"""VQAScore's question (arXiv 2404.01291)."""


def answer_variants(word: str) -> list[str]:
    """The spellings of an answer word counted as that answer: as given, lower case and capitalised, each with
    and without a leading space (BPE vocabularies hold " Yes" apart from "Yes")."""
    spellings = dict.fromkeys([word, word.lower(), word.capitalize()])
    return [prefix + spelling for spelling in spellings for prefix in ("", " ")]


def single_token_ids(tokenizer, word: str) -> list[int]:
    """Token ids of the variants of `word` that the tokenizer encodes as exactly one token, without duplicates."""
    ids = []
    for variant in answer_variants(word):
        encoded = tokenizer.encode(variant, add_special_tokens=False)
        if len(encoded) == 1 and encoded[0] not in ids:
            ids.append(encoded[0])
    return ids


def yes_probability(logits, yes_ids: list[int], no_ids: list[int]):
    """P(yes) / (P(yes) + P(no)) per row of next-token `logits` (B, V), in float32; computed from log-probabilities
    so that neither sum underflows to 0/0."""
    import torch

    log_probs = torch.log_softmax(logits.float(), dim=-1)
    log_yes = torch.logsumexp(log_probs[:, yes_ids], dim=-1)
    log_no = torch.logsumexp(log_probs[:, no_ids], dim=-1)
    return torch.sigmoid(log_yes - log_no)


class VlmJudge(ddpo.Reward):
    """P(yes) / (P(yes) + P(no)) of a Qwen2-VL judge asked whether the image shows the prompt (VQAScore-style)."""

    name = "vlm-judge"

    class Options(ddpo.Options):
        vlm: str = "Qwen/Qwen2-VL-2B-Instruct"
        """The judge (a Qwen2-VL or Qwen2.5-VL checkpoint in transformers' format): a hub id or a local directory."""
        question: str = DEFAULT_QUESTION
        """What the judge is asked; {prompt} is replaced by the sample's prompt (default: VQAScore's question)."""
        yes: str = pydantic.Field("yes", pattern=r"^\S+$")
        """The answer word scored as agreement (one word); its case and leading-space variants count too."""
        no: str = pydantic.Field("no", pattern=r"^\S+$")
        """The answer word scored as disagreement (one word); its case and leading-space variants count too."""
        max_pixels: int = pydantic.Field(512 * 512, ge=28 * 28)
        """Largest image given to the judge, in pixels (a 28x28 block is one image token); larger ones are shrunk."""
        dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
        """dtype of the VLM (auto: float16 on CUDA, else float32); the probabilities are taken in float32."""

        @pydantic.field_validator("question")
        @classmethod
        def _has_prompt_slot(cls, question: str) -> str:
            if "{prompt}" not in question:
                raise ValueError("must contain {prompt}")
            return question

    def load(self, device):
        import transformers

        from ddpo.plugins.rewards.clip_preprocessing import dtype_kwargs, resolve_dtype

        model_class = getattr(transformers, "AutoModelForImageTextToText", None)
        if model_class is None:
            raise UsageError(f"the vlm-judge reward needs transformers' AutoModelForImageTextToText (transformers "
                             f">= 4.50), this is transformers {transformers.__version__}; pip install -U transformers")
        vlm = self.options.vlm
        try:
            model_type = transformers.AutoConfig.from_pretrained(vlm).model_type
            if model_type not in QWEN_VL_MODEL_TYPES:
                raise UsageError(f"reward.vlm={vlm} is a {model_type} model; the vlm-judge reward reads Qwen2-VL and "
                                 f"Qwen2.5-VL checkpoints ({', '.join(QWEN_VL_MODEL_TYPES)})")
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(vlm, padding_side="left")
            self.image_processor = transformers.AutoImageProcessor.from_pretrained(
                vlm, max_pixels=self.options.max_pixels)
            self.vlm = model_class.from_pretrained(
                vlm, **dtype_kwargs(resolve_dtype(self.options.dtype, device))).to(device).eval().requires_grad_(False)
        except (OSError, ValueError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UsageError(f"reward.vlm={vlm}: cannot load a Qwen2-VL model with its tokenizer and image "
                             f"processor from it ({reason})") from None
        if not self.tokenizer.chat_template:
            raise UsageError(f"reward.vlm={vlm}: its tokenizer has no chat template; use an instruct checkpoint")
        self.image_token = self.tokenizer.convert_ids_to_tokens(self.vlm.config.image_token_id)
        forward_parameters = inspect.signature(self.vlm.forward).parameters
        self.takes_token_types = "mm_token_type_ids" in forward_parameters
        self.last_logits_only = {"logits_to_keep": 1} if "logits_to_keep" in forward_parameters else {}
        self.yes_ids = single_token_ids(self.tokenizer, self.options.yes)
        self.no_ids = single_token_ids(self.tokenizer, self.options.no)
        for option, ids in (("yes", self.yes_ids), ("no", self.no_ids)):
            if not ids:
                raise UsageError(f"reward.{option}={getattr(self.options, option)!r}: no spelling of it is one token "
                                 f"of {vlm}'s tokenizer; choose a shorter answer word")
        if set(self.yes_ids) & set(self.no_ids):
            raise UsageError(f"reward.yes={self.options.yes!r} and reward.no={self.options.no!r} share tokens")
        self.device = device

    def chat_prompt(self, prompt: str) -> str:
        """The judge's input text for one prompt: the chat template with one image and the question, up to the
        opening of the assistant's answer; the image is a single image token until `inputs` expands it."""
        conversation = [{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": self.options.question.replace("{prompt}", prompt)}]}]
        return self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)

    def inputs(self, images, prompts: list[str]) -> dict:
        """The model's batch on the device: image patches and grids, and the left-padded token ids with each
        image token repeated once per merged patch (what `Qwen2VLProcessor` does)."""
        vision = self.image_processor(images=list(images.detach().float().clamp(0, 1).cpu()), do_rescale=False,
                                      input_data_format="channels_first", return_tensors="pt")
        merged_patches = self.image_processor.merge_size ** 2
        texts = [self.chat_prompt(prompt).replace(self.image_token, self.image_token * (int(grid.prod())
                                                                                         // merged_patches), 1)
                 for prompt, grid in zip(prompts, vision["image_grid_thw"], strict=True)]
        tokens = self.tokenizer(texts, padding=True, return_tensors="pt")
        dtype = next(self.vlm.parameters()).dtype
        inputs = {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"],
                  "pixel_values": vision["pixel_values"].to(dtype), "image_grid_thw": vision["image_grid_thw"]}
        if self.takes_token_types:  # transformers 5 places the multimodal rotary positions by token type
            inputs["mm_token_type_ids"] = (tokens["input_ids"] == self.vlm.config.image_token_id).long()
        return {key: value.to(self.device) for key, value in inputs.items()}

    def __call__(self, images, prompts, metadata):
        import torch

        with torch.no_grad():
            # only the last position's logits: B x vocabulary (150k for Qwen), not B x length x vocabulary
            logits = self.vlm(**self.inputs(images, prompts), **self.last_logits_only).logits[:, -1]
        return yes_probability(logits, self.yes_ids, self.no_ids)


@ddpo.hookimpl
def register_rewards(register):
    register(VlmJudge)
