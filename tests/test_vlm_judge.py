"""The `vlm-judge` reward on a tiny random Qwen2-VL saved to disk and loaded through the real `from_pretrained`
path: its score is the model's own P(yes) / (P(yes) + P(no)) for the exact chat prompt, batches score as single
images do, the contract holds, the errors are one line, and `ddpo serve-reward vlm-judge` serves it."""

import os
import re
import subprocess
import sys

import pytest
import torch

import ddpo
from ddpo.core.configuration.errors import UsageError
from ddpo.plugins.rewards.remote import Remote
from ddpo.plugins.rewards.vlm_judge import VlmJudge, answer_variants
from ddpo.testing import build_tiny_qwen2_vl, build_tiny_text_encoder, check_reward

CPU = torch.device("cpu")
PROMPTS = ["a cat", "a red dog riding a bike", "two horses"]
YES_TOKENS, NO_TOKENS = ("Yes", "yes", "ĠYes", "Ġyes"), ("No", "no", "ĠNo", "Ġno")  # "Ġ": a leading space


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    return build_tiny_qwen2_vl(tmp_path_factory.mktemp("tiny-qwen2-vl"))


@pytest.fixture(scope="module")
def judge(tiny_qwen):
    """The reward on the tiny model, with its output layer scaled up so that the probabilities spread over [0, 1]
    (random logits of a tiny model all give about 0.5)."""
    reward = VlmJudge({"vlm": str(tiny_qwen), "max_pixels": 32 * 32})
    reward.load(CPU)
    reward.vlm.lm_head.weight.data.mul_(30)
    return reward


def random_images(batch=3, height=24, width=40, seed=0):
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def exact_prompt_score(judge, image, prompt, yes_tokens=YES_TOKENS):
    """P(yes) / (P(yes) + P(no)) in float64 from the model's logits for a hand-built Qwen2-VL chat prompt."""
    tokenizer, model = judge.tokenizer, judge.vlm
    vision = judge.image_processor(images=[image], do_rescale=False, input_data_format="channels_first",
                                   return_tensors="pt")
    image_tokens = int(vision["image_grid_thw"].prod()) // 4  # 2x2 patches merge into one token
    text = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
            + "<|image_pad|>" * image_tokens + f'<|vision_end|>Does this figure show "{prompt}"? Please answer yes '
            "or no.<|im_end|>\n<|im_start|>assistant\n")
    input_ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=input_ids, pixel_values=vision["pixel_values"],
                       image_grid_thw=vision["image_grid_thw"],
                       mm_token_type_ids=(input_ids == model.config.image_token_id).long()).logits[0, -1]
    probabilities = logits.double().softmax(dim=-1)
    yes = sum(probabilities[tokenizer.convert_tokens_to_ids(token)] for token in yes_tokens)
    no = sum(probabilities[tokenizer.convert_tokens_to_ids(token)] for token in NO_TOKENS)
    return float(yes / (yes + no))


def test_score_is_the_models_yes_probability_for_the_exact_prompt(judge):
    images = random_images()
    rewards = judge(images, PROMPTS, [{}] * 3)
    expected = [exact_prompt_score(judge, image, prompt) for image, prompt in zip(images, PROMPTS)]
    assert rewards.dtype == torch.float32 and rewards.tolist() == pytest.approx(expected, abs=1e-5)
    assert max(expected) - min(expected) > 0.05  # the scores depend on image and prompt
    capitalised_only = [exact_prompt_score(judge, image, prompt, ("Yes",)) for image, prompt in zip(images, PROMPTS)]
    assert max(abs(a - b) for a, b in zip(expected, capitalised_only)) > 1e-3  # every variant counts
    assert judge.yes_ids == [judge.tokenizer.convert_tokens_to_ids(token) for token in ("yes", "Ġyes", "Yes", "ĠYes")]


def test_question_takes_the_prompt_verbatim(tiny_qwen):
    """A prompt with braces goes in as it is, and so does the question's own text around {prompt}."""
    reward = VlmJudge({"vlm": str(tiny_qwen), "question": "Is {prompt} in {this} image?"})
    reward.load(CPU)
    assert reward.chat_prompt("a {curly} cat").endswith(
        "<|vision_start|><|image_pad|><|vision_end|>Is a {curly} cat in {this} image?<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_batch_scores_equal_one_by_one_with_left_padding(judge):
    images = random_images(seed=1)
    batch = judge(images, PROMPTS, [{}] * 3)
    single = torch.cat([judge(images[i:i + 1], [prompt], [{}]) for i, prompt in enumerate(PROMPTS)])
    torch.testing.assert_close(batch, single, atol=1e-5, rtol=0)
    inputs = judge.inputs(images, PROMPTS)
    assert (inputs["attention_mask"][:, -1] == 1).all() and (inputs["attention_mask"][:, 0] == 0).any()
    assert inputs["image_grid_thw"].tolist() == [[1, 6, 10]] * 3  # 24x40 fits in max_pixels: 6x10 patches of 4 px


def test_large_images_are_shrunk_to_max_pixels(judge):
    """64x96 (6144 pixels) scaled by sqrt(1024 / 6144) is 26x39, each side floored to a multiple of 8 (patch 4,
    merged 2x2): 24x32."""
    grid = judge.inputs(random_images(1, 64, 96), ["a cat"])["image_grid_thw"][0]
    assert (int(grid[1]) * 4, int(grid[2]) * 4) == (24, 32)


def test_check_reward_passes(tiny_qwen):
    rewards = check_reward(VlmJudge, {"vlm": str(tiny_qwen)})
    assert ((rewards > 0) & (rewards < 1)).all()


def test_answer_variants_cover_case_and_leading_space():
    assert answer_variants("yes") == ["yes", " yes", "Yes", " Yes"]
    assert answer_variants("No") == ["No", " No", "no", " no"]


def test_errors_are_one_line_usage_errors(tiny_qwen, tmp_path, monkeypatch):
    bert = build_tiny_text_encoder(tmp_path / "bert")
    cases = [({"vlm": str(tmp_path / "missing")}, f"reward.vlm={tmp_path / 'missing'}: cannot load a Qwen2-VL model"),
             ({"vlm": str(bert)}, f"reward.vlm={bert} is a bert model; the vlm-judge reward reads Qwen2-VL"),
             ({"vlm": str(tiny_qwen), "yes": "maybe"}, "reward.yes='maybe': no spelling of it is one token"),
             ({"vlm": str(tiny_qwen), "no": "YES"}, "reward.yes='yes' and reward.no='YES' share tokens")]
    for options, message in cases:
        with pytest.raises(UsageError, match=re.escape(message)) as error:
            VlmJudge(options).load(CPU)
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="must contain {prompt}"):
        VlmJudge({"question": "Is this good?"})
    for empty_or_several_words in ("", "yes please"):
        with pytest.raises(ValueError, match="String should match pattern"):
            VlmJudge({"yes": empty_or_several_words})
    import transformers

    monkeypatch.setattr(transformers, "AutoModelForImageTextToText", None)  # as transformers < 4.50 has it
    with pytest.raises(UsageError, match=r"needs transformers' AutoModelForImageTextToText \(transformers >= 4.50\)"):
        VlmJudge({"vlm": str(tiny_qwen)}).load(CPU)


def test_serve_reward_serves_it(tiny_qwen):
    """`ddpo serve-reward vlm-judge` on loopback with the tiny model: the remote reward (raw float32 images) gets
    the scores the reward gives here."""
    process = subprocess.Popen([sys.executable, "-m", "ddpo", "serve-reward", "vlm-judge", "--set",
                                f"reward.vlm={tiny_qwen}", "--port", "0", "--device", "cpu"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        line = process.stdout.readline()  # "serving reward 'vlm-judge' on http://127.0.0.1:PORT"
        assert "serving reward 'vlm-judge' on http://127.0.0.1:" in line, process.stderr.read() if not line else line
        remote = Remote({"url": line.split()[-1], "timeout": 60, "image_format": "raw"})
        remote.load(CPU)
        assert remote.served == {"reward": "vlm-judge", "options": {**VlmJudge.Options().model_dump(),
                                                                     "vlm": str(tiny_qwen)}}
        direct = VlmJudge({"vlm": str(tiny_qwen)})
        direct.load(CPU)
        images = random_images(2, 32, 32)
        expected = direct(images, PROMPTS[:2], [{}] * 2)
        assert remote(images, PROMPTS[:2], [{}] * 2) == pytest.approx(expected.tolist(), abs=1e-6)
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_registered_as_a_reward():
    from ddpo.core.plugin_api.registry import get_registry

    assert get_registry().get("rewards", "vlm-judge") is VlmJudge
