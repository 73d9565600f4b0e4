"""The `geneval` reward: GenEval's scoring rules (djghosh13/geneval evaluation/evaluate_images.py) and Flow-GRPO's
partial credit (yifan123/reward-server reward_server/gen_eval.py) on hand-made detections, then the real loading
and model path on a tiny random OWLv2 and CLIP saved to disk."""

import json
import random

import pytest
import torch
from PIL import Image

from ddpo.core.configuration.errors import UsageError
from ddpo.core.plugin_api.registry import get_registry
from ddpo.plugins.rewards.geneval import (BUILTIN_PROMPTS, COLORS, Detection, GenEval, GenEvalPrompts, box_iou,
                                          partial_score, relative_position, select_objects, strict_score)
from ddpo.testing import build_tiny_clip, build_tiny_owlv2, check_prompt_set, check_reward


def obj(x0, y0, x1, y1, confidence=0.9, color=None):
    return Detection((x0, y0, x1, y1), confidence, color)


def both(objects, metadata):
    return strict_score(objects, metadata), partial_score(objects, metadata)


# --- scoring by hand ---------------------------------------------------------------------------------------------

SINGLE = {"tag": "single_object", "include": [{"class": "dog", "count": 1}]}
TWO = {"tag": "two_object", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1}]}
COUNT_3 = {"tag": "counting", "include": [{"class": "bird", "count": 3}], "exclude": [{"class": "bird", "count": 4}]}
RED_CAR = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]}
BUS_AND_UMBRELLA = {"tag": "color_attr", "include": [{"class": "bus", "count": 1, "color": "green"},
                                                     {"class": "umbrella", "count": 1, "color": "orange"}]}
BOAT_BELOW_KITE = {"tag": "position", "include": [{"class": "kite", "count": 1},
                                                  {"class": "boat", "count": 1, "position": ["below", 0]}]}
KITE, BOAT_BELOW, BOAT_ABOVE = obj(0, 0, 10, 10), obj(0, 30, 10, 40), obj(0, -40, 10, -30)


def test_single_and_two_objects():
    assert both({"dog": [obj(0, 0, 5, 5)]}, SINGLE) == (1.0, 1.0)
    assert both({}, SINGLE) == (0.0, 0.0)
    assert both({"cat": [obj(0, 0, 5, 5)]}, SINGLE) == (0.0, 0.0)  # the wrong object
    # GenEval asks for at least `count` of an include clause; Flow-GRPO's count term wants exactly 1: 1 - |1 - 2| / 1
    assert both({"dog": [obj(0, 0, 5, 5), obj(9, 9, 14, 14)]}, SINGLE) == (1.0, 0.0)
    assert both({"dog": [obj(0, 0, 5, 5)], "cat": [obj(9, 9, 14, 14)]}, TWO) == (1.0, 1.0)
    assert both({"dog": [obj(0, 0, 5, 5)]}, TWO) == (0.0, 0.5)  # one of two count terms


def test_counts_must_be_exact_and_exclude_refuses_one_more():
    birds = [obj(10 * i, 0, 10 * i + 5, 5) for i in range(8)]
    assert both({"bird": birds[:3]}, COUNT_3) == (1.0, 1.0)
    assert both({"bird": birds[:2]}, COUNT_3) == (0.0, pytest.approx(2 / 3))  # 1 - |3 - 2| / 3
    assert both({"bird": birds[:4]}, COUNT_3) == (0.0, pytest.approx(2 / 3))  # strict: the exclude clause (4 >= 4)
    assert both({"bird": birds[:8]}, COUNT_3) == (0.0, 0.0)  # 1 - 5/3 < 0, clipped
    assert strict_score({"bird": birds[:4]}, {"include": COUNT_3["include"]}) == 1.0  # without exclude: at least 3


def test_colour_of_the_most_confident_objects():
    assert both({"car": [obj(0, 0, 5, 5, color="red")]}, RED_CAR) == (1.0, 1.0)
    assert both({"car": [obj(0, 0, 5, 5, color="blue")]}, RED_CAR) == (0.0, 0.5)  # count term 1, colour term 0
    assert both({}, RED_CAR) == (0.0, 0.0)  # a count miss also zeroes the colour term
    # strict looks at the most confident car only (blue): wrong; partial: two cars for one, count and colour 0
    cars = [obj(0, 0, 5, 5, 0.9, "blue"), obj(9, 9, 14, 14, 0.5, "red")]
    assert both({"car": cars}, RED_CAR) == (0.0, 0.0)
    two_red = {"include": [{"class": "car", "count": 2, "color": "red"}]}
    one_red = [obj(0, 0, 5, 5, 0.9, "red"), obj(9, 9, 14, 14, 0.8, "white")]
    assert both({"car": one_red}, two_red) == (0.0, 0.75)  # terms 1 and 1 - |2 - 1| / 2


def test_colour_attributes_of_two_objects():
    bus, umbrella = obj(0, 0, 5, 5, color="green"), obj(9, 9, 14, 14, color="orange")
    assert both({"bus": [bus], "umbrella": [umbrella]}, BUS_AND_UMBRELLA) == (1.0, 1.0)
    red_umbrella = umbrella._replace(color="red")
    assert both({"bus": [bus], "umbrella": [red_umbrella]}, BUS_AND_UMBRELLA) == (0.0, 0.75)  # terms 1, 1, 1, 0


@pytest.mark.parametrize("box_a, box_b, relations", [
    ((0, 0, 10, 10), (20, 0, 30, 10), {"left of"}),  # offset -20, margin 0.1 * 20: d_x = -18 / 20
    ((20, 0, 30, 10), (0, 0, 10, 10), {"right of"}),
    ((0, 0, 10, 10), (0, 20, 10, 30), {"above"}),  # image y points down
    ((0, 20, 10, 30), (0, 0, 10, 10), {"below"}),
    ((0, 0, 10, 10), (20, 20, 30, 30), {"left of", "above"}),  # d = (-18, -18) / 28.3 = (-0.64, -0.64)
    ((0, 0, 10, 10), (20, 8, 30, 18), {"left of"}),  # d = (-18, -6) / 21.5: d_y = -0.28 is no relation
    ((0, 0, 20, 20), (3, 0, 23, 20), set()),  # offset 3 within the margin 0.1 * 40
    ((0, 0, 20, 20), (0, 0, 20, 20), set()),
])
def test_relations_by_box_centres_with_the_margin(box_a, box_b, relations):
    assert relative_position(box_a, box_b) == relations


def test_the_margin_decides_close_objects():
    a, b = (0, 0, 20, 20), (10, 0, 30, 20)  # centres 10 apart, boxes 40 wide together
    assert relative_position(a, b, position_threshold=0.1) == {"left of"}  # (10 - 4) / 10 = 0.6 > 0.5
    assert relative_position(a, b, position_threshold=0.15) == set()  # (10 - 6) / 10 = 0.4
    assert relative_position(a, b, position_threshold=0.3) == set()  # 12 > 10: nothing left
    # off-axis: offset (-10, -6), sizes (40, 40): margin 0.1 leaves (-6, -2) / 11.66 = (-0.51, -0.17)
    assert relative_position((0, 0, 20, 20), (10, 6, 30, 26)) == {"left of"}
    # margin 0.15 leaves (-4, 0) / 11.66 = -0.34: no relation, though A is left of and above B
    assert relative_position((0, 0, 20, 20), (10, 6, 30, 26), position_threshold=0.15) == set()


def test_position_against_the_objects_of_the_referenced_clause():
    assert both({"kite": [KITE], "boat": [BOAT_BELOW]}, BOAT_BELOW_KITE) == (1.0, 1.0)
    assert both({"kite": [KITE], "boat": [BOAT_ABOVE]}, BOAT_BELOW_KITE) == (0.0, pytest.approx(2 / 3))  # 1, 1, 0
    # no kite: its count term 0; the boat's count 1, its position 0 (nothing to be below)
    assert both({"boat": [BOAT_BELOW]}, BOAT_BELOW_KITE) == (0.0, pytest.approx(1 / 3))
    # two boats asked: both must be below the kite
    two_boats = {"include": [{"class": "kite", "count": 1}, {"class": "boat", "count": 2, "position": ["below", 0]}]}
    beside = obj(30, 0, 40, 10)
    assert both({"kite": [KITE], "boat": [BOAT_BELOW, BOAT_BELOW]}, two_boats) == (1.0, 1.0)
    assert both({"kite": [KITE], "boat": [BOAT_BELOW, beside]}, two_boats) == (0.0, pytest.approx(2 / 3))


def test_strict_position_uses_the_most_confident_objects():
    kites = [obj(0, 0, 10, 10, 0.9), obj(0, 100, 10, 110, 0.4)]  # the second kite is below the boat
    assert strict_score({"kite": kites, "boat": [BOAT_BELOW]}, BOAT_BELOW_KITE) == 1.0
    # partial counts both kites: count term 0 and no kite kept to be below, so 0, 1, 0
    assert partial_score({"kite": kites, "boat": [BOAT_BELOW]}, BOAT_BELOW_KITE) == pytest.approx(1 / 3)


# --- selecting detections ----------------------------------------------------------------------------------------

def test_iou_counts_pixels_inclusively():
    assert box_iou((0, 0, 9, 9), (5, 0, 14, 9)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 9, 9), (20, 20, 29, 29)) == 0.0


def test_detections_above_the_threshold_most_confident_first_per_class():
    boxes = [(0, 0, 9, 9), (1, 0, 10, 9), (50, 50, 59, 59), (20, 20, 29, 29), (30, 30, 39, 39)]
    scores = [0.5, 0.8, 0.3, 0.95, 0.7]
    labels = [0, 0, 0, 1, 2]  # label 2: a padding query of the batch
    objects = select_objects(boxes, scores, labels, ["dog", "cat"], threshold=0.3)
    assert [d.confidence for d in objects["dog"]] == [0.8, 0.5]  # 0.3 is not above 0.3
    assert objects["cat"] == [Detection((20, 20, 29, 29), 0.95)] and set(objects) == {"dog", "cat"}
    assert [d.confidence for d in select_objects(boxes, scores, labels, ["dog"], 0.0, max_objects=1)["dog"]] == [0.8]
    # boxes 0 and 1 overlap by IoU 90/110: at max_overlap 0.5 the less confident goes
    assert len(select_objects(boxes, scores, labels, ["dog"], 0.0, max_overlap=0.5)["dog"]) == 2  # 0.8 and 0.3
    assert select_objects(boxes, scores, labels, ["dog"], 0.99) == {}


# --- prompt set --------------------------------------------------------------------------------------------------

def test_builtin_prompts_cover_the_six_tasks():
    entries = [json.loads(line) for line in BUILTIN_PROMPTS.read_text().splitlines()]
    tags = [entry["tag"] for entry in entries]
    assert {tag: tags.count(tag) for tag in tags} == dict.fromkeys(
        ["single_object", "two_object", "counting", "colors", "position", "color_attr"], 4)
    prompts = check_prompt_set(GenEvalPrompts)
    prompt, metadata = GenEvalPrompts().sample(random.Random(1))
    assert prompt == metadata["prompt"] and metadata in entries and set(prompts) <= {e["prompt"] for e in entries}


def test_prompt_file_and_its_errors(tmp_path):
    good = {"tag": "colors", "include": [{"class": "vase", "count": 1, "color": "blue"}], "prompt": "a blue vase"}
    path = tmp_path / "metadata.jsonl"
    path.write_text(json.dumps(good) + "\n\n")
    assert GenEvalPrompts({"path": str(path)}).sample(random.Random(0)) == ("a blue vase", good)
    bad_lines = {
        '{"prompt": "a vase"}': 'no "include"',
        json.dumps({**good, "include": [{"class": "vase", "count": 1, "color": "teal"}]}): "color 'teal'",
        json.dumps({**good, "include": [{"class": "vase", "count": 1, "position": ["near", 0]}]}): "position",
        json.dumps({**good, "include": [{"class": "vase", "count": 0}]}): '"count" of at least 1',
        "{not json": "is not JSON",
    }
    for line, message in bad_lines.items():
        path.write_text(json.dumps(good) + "\n" + line + "\n")
        with pytest.raises(UsageError, match=f"metadata.jsonl:2 .*{message}") as error:
            GenEvalPrompts({"path": str(path)})
        assert "\n" not in str(error.value)
    with pytest.raises(UsageError, match="is not a file"):
        GenEvalPrompts({"path": str(tmp_path / "missing.jsonl")})


# --- the models: tiny random OWLv2 and CLIP, loaded through from_pretrained ----------------------------------------

@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    directory = tmp_path_factory.mktemp("geneval")
    return str(build_tiny_owlv2(directory / "owlv2")), str(build_tiny_clip(directory / "clip"))


def loaded(tiny_models, **options):
    detector, clip = tiny_models
    reward = get_registry().get("rewards", "geneval")(GenEval.Options(detector=detector, clip_model=clip, **options))
    reward.load(torch.device("cpu"))
    return reward


IMAGES = torch.rand(2, 3, 40, 32, generator=torch.Generator().manual_seed(0))  # not square: OWLv2 pads


def pil(images):
    return [Image.fromarray(image) for image in (images * 255).round().byte().permute(0, 2, 3, 1).numpy()]


def test_detections_are_the_processors_post_processed_output(tiny_models):
    from transformers import Owlv2ForObjectDetection, Owlv2Processor

    reward = loaded(tiny_models)
    queries = [["dog", "cat"], ["fire hydrant"]]
    images = pil(IMAGES)
    found = reward.detect(images, queries)
    processor = Owlv2Processor.from_pretrained(tiny_models[0])
    model = Owlv2ForObjectDetection.from_pretrained(tiny_models[0]).eval()
    with torch.no_grad():
        outputs = model(**processor(text=queries, images=images, return_tensors="pt"))
    expected = processor.post_process_grounded_object_detection(outputs, threshold=0.0, target_sizes=[(40, 40)] * 2)
    assert len(found[0]["scores"]) == 16  # (32 / 8)^2 patches, one box each
    for ours, theirs in zip(found, expected, strict=True):
        for key in ("scores", "labels", "boxes"):
            torch.testing.assert_close(ours[key], theirs[key])
    # the second image was asked one class and a padding query: only boxes labelled with its class are objects
    objects = select_objects(found[1]["boxes"].tolist(), found[1]["scores"].tolist(), found[1]["labels"].tolist(),
                             ["fire hydrant"], threshold=0.0)
    assert len(objects.get("fire hydrant", [])) == int((found[1]["labels"] == 0).sum())


def test_the_counting_threshold_applies_to_counting_prompts(tiny_models):
    # one query per prompt, so every box is an apple (or a giraffe); max_objects caps what is kept
    prompts = ["a photo of two apples", "a photo of a giraffe"]
    metadata = [{"tag": "counting", "include": [{"class": "apple", "count": 2}],
                 "exclude": [{"class": "apple", "count": 3}]},
                {"tag": "single_object", "include": [{"class": "giraffe", "count": 1}]}]
    counting_only = loaded(tiny_models, threshold=1.0, counting_threshold=0.0, max_objects=2, score="strict")
    assert counting_only(IMAGES, prompts, metadata) == [1.0, 0.0]
    others_only = loaded(tiny_models, threshold=0.0, counting_threshold=1.0, max_objects=1)
    assert others_only(IMAGES, prompts, metadata) == [0.0, 1.0]


def test_colour_is_clips_zero_shot_choice_on_the_crop(tiny_models):
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    reward = loaded(tiny_models, threshold=0.0, max_objects=1)
    image = IMAGES[:1]
    scores = [reward(image, ["a photo of a car"], [{"include": [{"class": "car", "count": 1, "color": color}]}])[0]
              for color in COLORS]
    assert sorted(scores) == [0.5] * 9 + [1.0]  # the car is found; exactly one colour is its colour
    # that colour, computed apart: CLIP's own processor on the PIL crop of the most confident box
    found = reward.detect(pil(image), [["car"]])[0]
    box = found["boxes"][found["scores"].argmax()].tolist()
    crop = pil(image)[0].crop([round(v) for v in box])
    model = CLIPModel.from_pretrained(tiny_models[1]).eval()
    tokenizer = CLIPTokenizer.from_pretrained(tiny_models[1])
    with torch.no_grad():
        pixels = CLIPImageProcessor.from_pretrained(tiny_models[1])(images=crop, return_tensors="pt").pixel_values
        image_embedding = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        texts = [t.format(color=c, cls="car") for c in COLORS for t in ("a photo of a {color} {cls}",
                 "a photo of a {color}-colored {cls}", "a photo of a {color} object")]
        tokens = tokenizer(texts, padding=True, return_tensors="pt")
        text = model.text_projection(model.text_model(**tokens).pooler_output)
    text = torch.nn.functional.normalize(torch.nn.functional.normalize(text, dim=-1).view(10, 3, -1).mean(1), dim=-1)
    similarity = torch.nn.functional.normalize(image_embedding, dim=-1) @ text.T
    assert scores[int(similarity.argmax())] == 1.0


def test_geneval_meets_the_reward_contract(tiny_models):
    detector, clip = tiny_models
    options = {"detector": detector, "clip_model": clip, "dtype": "float32"}
    # metadata {}: the prompt "a cat" is the one object asked for; 16 boxes above 0, one kept: found exactly once
    assert check_reward(GenEval, {**options, "threshold": 0.0, "max_objects": 1}).tolist() == [1.0] * 3
    assert check_reward(GenEval, {**options, "threshold": 1.0}, check_import=False).tolist() == [0.0] * 3
    with pytest.raises(AssertionError, match="rejects"):
        check_reward(GenEval, {**options, "score": "lenient"}, check_import=False)

