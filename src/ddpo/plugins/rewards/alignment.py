"""Prompt-image alignment (Black et al., 2023, "Training Diffusion Models with Reinforcement Learning", §6.3):
a vision-language model describes the image, and the description is compared with the prompt.

    answer_b = VLM(image_b, "what is going on in this image?")          (greedy decoding)
    reward_b = BERTScore recall of answer_b against "The image contains {prompt_b}"

BERTScore recall (Zhang et al., 2020) with the default settings of the `bert_score` package (no idf weighting,
no baseline rescaling): token embeddings from one hidden layer of an encoder, L2-normalised; each token of the
reference (special tokens such as [CLS]/[SEP] excluded) is matched to its most similar token of the answer
(special tokens included), and the recall is the mean of those cosine similarities:

    R = 1/|ref| sum_{i in ref} max_{j in answer} <r_i, a_j>

The layer is the one BERTScore tuned per encoder (its `model2layers` table; hidden_states[layer], 0 being the
embeddings), for the encoders in `BERTSCORE_LAYERS`; set `scorer_layer` for any other encoder.

The VLM is any LLaVA checkpoint in transformers' format (`LlavaForConditionalGeneration` + its processor);
the question is asked through the processor's chat template when it has one, else in LLaVA-1.5's format
"USER: <image>\\n{question} ASSISTANT:". Scoring is batched: one `generate` call (left padding) and one encoder
pass for the whole batch.

Cost: `llava-hf/llava-1.5-7b-hf` has about 7.1B parameters: 14 GB in float16 (28 GB in float32), plus the
generation cache; `roberta-large` 355M (1.4 GB float32). Plan on a 24 GB GPU for both at float16, or serve the
reward from one GPU to every training process (`ddpo serve-reward alignment` and the `remote` reward).
Generation dominates the time: `max_new_tokens` sequential decoder steps per batch.
"""

from __future__ import annotations

from typing import Literal

import pydantic

import ddpo
from ddpo.core.configuration.errors import UsageError

BERTSCORE_LAYERS = {
    "bert-base-uncased": 9, "bert-large-uncased": 18, "roberta-base": 10, "roberta-large": 17,
    "roberta-large-mnli": 19, "distilbert-base-uncased": 5, "distilroberta-base": 5,
    "FacebookAI/roberta-base": 10, "FacebookAI/roberta-large": 17, "FacebookAI/roberta-large-mnli": 19,
    "google-bert/bert-base-uncased": 9, "google-bert/bert-large-uncased": 18,
    "distilbert/distilbert-base-uncased": 5, "distilbert/distilroberta-base": 5,
}
"""Hidden layer per encoder, from BERTScore's `model2layers` table (layers chosen there for the best
correlation with human judgements on WMT16)."""
LLAVA_15_PROMPT = "USER: <image>\n{question} ASSISTANT:"


def bertscore_recall(reference_embeddings, reference_weights, answer_embeddings, answer_mask):
    """BERTScore recall per pair, (B,).

    Args:
        reference_embeddings: (B, R, D) token embeddings of the references.
        reference_weights: (B, R) 1 for the tokens that count (not padding, not special), else 0.
        answer_embeddings: (B, A, D) token embeddings of the answers.
        answer_mask: (B, A) True for the answers' real tokens (not padding).
    """
    import torch
    import torch.nn.functional as F

    similarity = F.normalize(reference_embeddings.float(), dim=-1) @ F.normalize(answer_embeddings.float(),
                                                                                dim=-1).transpose(1, 2)
    similarity = similarity.masked_fill(~answer_mask[:, None, :].bool(), -torch.inf)
    best = similarity.max(dim=-1).values.masked_fill(reference_weights == 0, 0.0)
    return (best * reference_weights).sum(dim=-1) / reference_weights.sum(dim=-1).clamp(min=1)


class Alignment(ddpo.Reward):
    """Prompt-image alignment: BERTScore recall of a LLaVA description against "The image contains {prompt}"."""

    name = "alignment"

    class Options(ddpo.Options):
        vlm: str = "llava-hf/llava-1.5-7b-hf"
        """The vision-language model (LLaVA in transformers' format): a hub id or a local directory."""
        question: str = "what is going on in this image?"
        """What the VLM is asked (DDPO's question)."""
        reference: str = "The image contains {prompt}"
        """The text the answer is compared with; {prompt} is replaced by the sample's prompt."""
        max_new_tokens: int = pydantic.Field(64, ge=1, le=1024)
        """Length limit of the VLM's answer, in tokens."""
        scorer: str = "roberta-large"
        """Encoder for BERTScore (BERTScore's English default): a hub id or a local directory."""
        scorer_layer: int | None = pydantic.Field(None, ge=0)
        """Hidden layer of the scorer (0 = embeddings); default: BERTScore's layer for the known encoders."""
        dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
        """dtype of the VLM (auto: float16 on CUDA, else float32); the scorer runs in float32."""

        @pydantic.field_validator("reference")
        @classmethod
        def _has_prompt_slot(cls, reference: str) -> str:
            if "{prompt}" not in reference:
                raise ValueError("must contain {prompt}")
            return reference

    def load(self, device):
        import transformers

        from ddpo.plugins.rewards.clip_preprocessing import dtype_kwargs, resolve_dtype

        self.layer = self.options.scorer_layer
        if self.layer is None:
            if self.options.scorer not in BERTSCORE_LAYERS:
                raise UsageError(f"no BERTScore layer known for reward.scorer={self.options.scorer}; set "
                                 f"reward.scorer_layer (known: {', '.join(sorted(BERTSCORE_LAYERS))})")
            self.layer = BERTSCORE_LAYERS[self.options.scorer]
        self.device = device
        self.vlm = transformers.LlavaForConditionalGeneration.from_pretrained(
            self.options.vlm, **dtype_kwargs(resolve_dtype(self.options.dtype, device))).to(device).eval()
        self.processor = transformers.AutoProcessor.from_pretrained(self.options.vlm)
        self.processor.tokenizer.padding_side = "left"  # batched generation continues every row at its end
        self.scorer_tokenizer = transformers.AutoTokenizer.from_pretrained(self.options.scorer)
        self.scorer = transformers.AutoModel.from_pretrained(self.options.scorer).to(device).eval()
        layers = self.scorer.config.num_hidden_layers
        if self.layer > layers:
            raise UsageError(f"reward.scorer_layer={self.layer} but {self.options.scorer} has {layers} layers")

    def vlm_prompt(self) -> str:
        if getattr(self.processor, "chat_template", None):
            conversation = [{"role": "user", "content": [{"type": "image"},
                                                         {"type": "text", "text": self.options.question}]}]
            return self.processor.apply_chat_template(conversation, add_generation_prompt=True)
        return LLAVA_15_PROMPT.format(question=self.options.question)

    def describe(self, images) -> list[str]:
        """The VLM's answers to the question, one per image (B, 3, H, W) in [0, 1]; greedy, so deterministic."""
        pixels = (images.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        inputs = self.processor(images=list(pixels), text=[self.vlm_prompt()] * len(pixels), return_tensors="pt",
                                padding=True)
        dtype = next(self.vlm.parameters()).dtype
        inputs = {key: value.to(self.device, dtype) if key == "pixel_values" else value.to(self.device)
                  for key, value in inputs.items()}
        tokens = self.vlm.generate(**inputs, max_new_tokens=self.options.max_new_tokens, do_sample=False)
        return self.processor.batch_decode(tokens[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    def token_embeddings(self, texts: list[str]):
        """Hidden states of the scorer's BERTScore layer (B, L, D), the attention mask and the special-token
        mask (B, L)."""
        tokens = self.scorer_tokenizer(texts, padding=True, truncation=True, return_special_tokens_mask=True,
                                       return_tensors="pt")
        output = self.scorer(input_ids=tokens["input_ids"].to(self.device),
                             attention_mask=tokens["attention_mask"].to(self.device), output_hidden_states=True)
        return (output.hidden_states[self.layer], tokens["attention_mask"].to(self.device),
                tokens["special_tokens_mask"].to(self.device))

    def recall(self, answers: list[str], references: list[str]):
        """BERTScore recall (B,) of each answer against its reference."""
        reference_embeddings, reference_mask, reference_special = self.token_embeddings(references)
        answer_embeddings, answer_mask, _ = self.token_embeddings(answers)
        weights = (reference_mask * (1 - reference_special)).float()
        return bertscore_recall(reference_embeddings, weights, answer_embeddings, answer_mask)

    def __call__(self, images, prompts, metadata):
        references = [self.options.reference.format(prompt=prompt) for prompt in prompts]
        return self.recall(self.describe(images), references)


@ddpo.hookimpl
def register_rewards(register):
    register(Alignment)
