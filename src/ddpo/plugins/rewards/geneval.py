"""`geneval`: does the image hold the objects the prompt asks for, in the numbers, colours and places it asks?
GenEval's compositional check (Ghosh et al., 2023, arXiv 2310.11513), the reward Flow-GRPO trains on (Liu et al.,
2025, arXiv 2505.05470; GenEval 0.63 -> 0.95 on SD3.5-M).

Each prompt carries GenEval's metadata (the format of djghosh13/geneval prompts/evaluation_metadata.jsonl):

    {"tag": "position", "prompt": "a photo of a dog right of a teddy bear",
     "include": [{"class": "teddy bear", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0]}]}

`tag` names the task (single_object, two_object, counting, colors, position, color_attr). Each `include` clause
asks for `count` objects of `class`, optionally of a `color` (one of GenEval's ten, `COLORS`) and in a `position`
(`left of`, `right of`, `above`, `below`) relative to the objects of an earlier clause, named by its index. Each
`exclude` clause asks for fewer than `count` objects of `class` (GenEval's counting prompts exclude count + 1). A
prompt whose metadata has no `include` asks for one object named by the whole prompt.

Detection (GenEval's evaluate_images.py:230-244): OWLv2 (transformers' `Owlv2ForObjectDetection`, open-vocabulary;
GenEval runs a COCO Mask2Former) is queried with the prompt's class names. Per class the boxes scoring above
`threshold` (`counting_threshold` on counting prompts) are kept, most confident first, at most `max_objects`,
dropping a box that overlaps a kept one by IoU >= `max_overlap` (1: never). An object's colour is CLIP's zero-shot
choice among the ten colours on its box crop, each colour's text embedding the mean of "a photo of a {color}
{class}", "a photo of a {color}-colored {class}" and "a photo of a {color} object" (evaluate_images.py:109-127).
Object A is in a relation to B by their box centres (evaluate_images.py:140-157): with c = centre(A) - centre(B)
and s the summed widths and heights of the two boxes (y points down),

    d = sign(c) * max(|c| - position_threshold * s, 0) / ||c||            per axis
    left of: d_x < -0.5     right of: d_x > 0.5     above: d_y < -0.5     below: d_y > 0.5

Scores, the `score` option:
- `strict`: GenEval's own per-prompt verdict (evaluate_images.py:160-220), 1 or 0. Every include clause finds at
  least `count` objects; its `count` most confident are all of the colour asked, and each is in the relation asked
  to every object the referenced clause kept (a clause that failed leaves none: the relation fails); every exclude
  clause finds fewer than `count`. The GenEval benchmark number is its mean.
- `partial` (default): Flow-GRPO's training reward, the mean of one term per requirement (yifan123/reward-server
  reward_server/gen_eval.py:201-264; :330 returns it as `scores`, which flow_grpo/rewards.py:383-393 weights into
  the reward trained on, while the 0/1 verdicts are only logged as accuracies). Per include clause,
  with n = `count` and all objects found counted (counts must be exact):
      count     max(0, 1 - |n - found| / n)
      colour    1 - |n - found of that colour| / n      when found = n, else 0
      position  1 if every pair is in the relation, else 0 (scored only when count and colour held; a count miss
                scores one 0 for colour and position together)
  Exclude clauses add no term: exact counts already refuse GenEval's "count + 1" excludes, and Flow-GRPO skips them.
  Two departures from that code: its count term goes below 0 when more than 2n objects are found (clipped here, so
  the reward stays in [0, 1]), and a failed position there adds a 0 and then a 1 (gen_eval.py:254, :258; here the 0).
  Default because it is what Flow-GRPO trains on, and because it grades: in a group of images that all fail the
  strict verdict, the one with the right count but the wrong colour still earns more, so group-relative
  advantages are not all zero. Use `strict` for evaluation (`eval.rewards`), to report GenEval's number.

Defaults: `threshold` 0.3, `max_objects` 16, `max_overlap` 1 and `position_threshold` 0.1 are GenEval's
(evaluate_images.py:286-290, kept by reward_server/gen_eval.py:312-316). GenEval's `counting_threshold` is 0.9, a
value for Mask2Former's confidences; OWLv2's are lower (0.74 and 0.63 for the two plain cats of COCO image 39769
with google/owlv2-base-patch16-ensemble queried as "a photo of a cat", transformers.js PR 579), so at 0.9 it would
find nothing to count. Here it defaults to `threshold`'s 0.3; neither value is calibrated for OWLv2 yet. The colour
CLIP is OpenAI's ViT-L/14, as GenEval's (open_clip "ViT-L-14", pretrained "openai", evaluate_images.py:66-67).

Cost: OWLv2 B/16 has about 155M parameters (0.6 GB float32) and sees images padded and resized to 960 x 960; CLIP
ViT-L/14 428M (1.7 GB float32). One detector pass per image, one CLIP pass per kept object of a class with a colour
asked.

The prompt set `geneval` draws from a GenEval-format JSONL file (`prompts.path`), or from 24 built-in prompts,
four per task (ddpo/assets/geneval_prompts.jsonl).
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Literal, NamedTuple

import pydantic

import ddpo
from ddpo.core.configuration.errors import UsageError

COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
COLOR_TEMPLATES = ("a photo of a {color} {cls}", "a photo of a {color}-colored {cls}", "a photo of a {color} object")
RELATIONS = ("left of", "right of", "above", "below")
BUILTIN_PROMPTS = Path(__file__).resolve().parents[2] / "assets" / "geneval_prompts.jsonl"


class Detection(NamedTuple):
    """One detected object: its box (x0, y0, x1, y1) in pixels, the detector's confidence, and its colour when a
    clause asks for one."""

    box: tuple[float, float, float, float]
    confidence: float
    color: str | None = None


def box_iou(box_a, box_b) -> float:
    """Intersection over union with GenEval's pixel convention (a box spans x1 - x0 + 1 pixels)."""
    def area(box):
        return max(box[2] - box[0] + 1, 0) * max(box[3] - box[1] + 1, 0)

    inner = area((max(box_a[0], box_b[0]), max(box_a[1], box_b[1]), min(box_a[2], box_b[2]), min(box_a[3], box_b[3])))
    union = area(box_a) + area(box_b) - inner
    return inner / union if union else 0.0


def select_objects(boxes, scores, labels, classes: list[str], threshold: float, max_objects: int = 16,
                   max_overlap: float = 1.0) -> dict[str, list[Detection]]:
    """The objects GenEval keeps of one image's detections: per class (label = index into `classes`; other labels,
    the batch's padding queries, are dropped), confidence above `threshold`, most confident first, the first
    `max_objects`, then greedily without boxes overlapping a kept one by IoU >= `max_overlap` (1: all kept)."""
    objects = {}
    for index, name in enumerate(classes):
        ranked = sorted((Detection(tuple(box), score) for box, score, label in zip(boxes, scores, labels, strict=True)
                         if label == index and score > threshold), key=lambda detection: -detection.confidence)
        ranked, kept = ranked[:max_objects], []
        while ranked:
            best = ranked.pop(0)
            kept.append(best)
            if max_overlap < 1:
                ranked = [other for other in ranked if box_iou(best.box, other.box) < max_overlap]
        if kept:
            objects[name] = kept
    return objects


def relative_position(box_a, box_b, position_threshold: float = 0.1) -> set[str]:
    """The relations of box A to box B ({"left of", "above"}, ...; empty when the centres are too close)."""
    offset = [(box_a[0] + box_a[2] - box_b[0] - box_b[2]) / 2, (box_a[1] + box_a[3] - box_b[1] - box_b[3]) / 2]
    sizes = [abs(box_a[2] - box_a[0]) + abs(box_b[2] - box_b[0]), abs(box_a[3] - box_a[1]) + abs(box_b[3] - box_b[1])]
    revised = [max(abs(o) - position_threshold * s, 0.0) * (1 if o > 0 else -1) for o, s in zip(offset, sizes)]
    if all(abs(value) < 1e-3 for value in revised):
        return set()
    norm = (offset[0] ** 2 + offset[1] ** 2) ** 0.5
    dx, dy = revised[0] / norm, revised[1] / norm
    return {relation for relation, holds in (("left of", dx < -0.5), ("right of", dx > 0.5), ("above", dy < -0.5),
                                             ("below", dy > 0.5)) if holds}


def _in_relation(found, targets, relation: str, position_threshold: float) -> bool:
    return all(relation in relative_position(a.box, b.box, position_threshold) for a in found for b in targets)


def strict_score(objects: dict[str, list[Detection]], metadata: dict, position_threshold: float = 0.1) -> float:
    """GenEval's verdict, 1.0 or 0.0, on the kept `objects` per class (most confident first)."""
    correct, kept_by_clause = True, []
    for clause in metadata["include"]:
        found = objects.get(clause["class"], [])[:clause["count"]]
        matched = len(found) >= clause["count"]
        if matched and "color" in clause:
            matched = sum(detection.color == clause["color"] for detection in found) >= clause["count"]
        if matched and "position" in clause:
            relation, target = clause["position"]
            targets = kept_by_clause[target]
            matched = targets is not None and _in_relation(found, targets, relation, position_threshold)
        correct = correct and matched
        kept_by_clause.append(found if matched else None)
    for clause in metadata.get("exclude", []):
        correct = correct and len(objects.get(clause["class"], [])) < clause["count"]
    return float(correct)


def partial_score(objects: dict[str, list[Detection]], metadata: dict, position_threshold: float = 0.1) -> float:
    """Flow-GRPO's partial credit in [0, 1]: the mean of the count, colour and position terms (module docstring)."""
    terms, kept_by_clause = [], []
    for clause in metadata["include"]:
        found, count = objects.get(clause["class"], []), clause["count"]
        terms.append(max(0.0, 1 - abs(count - len(found)) / count))
        matched = len(found) == count
        if not matched and ("color" in clause or "position" in clause):
            terms.append(0.0)
        if matched and "color" in clause:
            of_color = sum(detection.color == clause["color"] for detection in found)
            terms.append(1 - abs(count - of_color) / count)
            matched = of_color == count
        if matched and "position" in clause:
            relation, target = clause["position"]
            targets = kept_by_clause[target]
            matched = targets is not None and _in_relation(found, targets, relation, position_threshold)
            terms.append(float(matched))
        kept_by_clause.append(found if matched else None)
    return sum(terms) / len(terms) if terms else 0.0


SCORES = {"strict": strict_score, "partial": partial_score}


def prompt_metadata(prompt: str, metadata: dict) -> dict:
    """The GenEval metadata to check `prompt` against: its own, or one object named by the whole prompt."""
    if "include" in metadata:
        return metadata
    return {"tag": "single_object", "include": [{"class": prompt, "count": 1}], "prompt": prompt}


def queried_classes(metadata: dict) -> list[str]:
    """The class names to ask the detector for, each once, in the order the clauses name them."""
    return list(dict.fromkeys(clause["class"] for clause in metadata["include"] + metadata.get("exclude", [])))


def metadata_problem(entry) -> str | None:
    """What makes `entry` unusable as GenEval metadata with a prompt, or None when it is fine."""
    if not isinstance(entry, dict):
        return "not a JSON object"
    if not isinstance(entry.get("prompt"), str):
        return 'no "prompt" string'
    if not isinstance(entry.get("include"), list) or not entry["include"]:
        return 'no "include" list of clauses'
    for key in ("include", "exclude"):
        for index, clause in enumerate(entry.get(key, [])):
            where = f'"{key}"[{index}]'
            if not isinstance(clause, dict) or not isinstance(clause.get("class"), str):
                return f'{where} has no "class" string'
            if type(clause.get("count")) is not int or clause["count"] < 1:
                return f'{where} needs a "count" of at least 1'
            if key == "exclude":
                continue
            if "color" in clause and clause["color"] not in COLORS:
                return f'{where} has color {clause["color"]!r}; GenEval\'s colours are {", ".join(COLORS)}'
            position = clause.get("position")
            if position is not None and not (isinstance(position, list) and len(position) == 2
                                             and position[0] in RELATIONS and type(position[1]) is int
                                             and 0 <= position[1] < index):
                return (f'{where} has position {position!r}; expected [relation, index of an earlier clause] '
                        f'with relation one of {", ".join(RELATIONS)}')
    return None


def read_metadata_file(path: Path) -> list[dict]:
    """The prompts of a GenEval-format JSONL file; a UsageError names the first line that is not one."""
    if not path.is_file():
        raise UsageError(f"prompts.path='{path}' is not a file; the 'geneval' prompt set reads GenEval metadata, "
                         "one JSON object a line")
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise UsageError(f"{path}:{number} is not JSON ({error.msg})") from None
        problem = metadata_problem(entry)
        if problem:
            raise UsageError(f"{path}:{number} is not GenEval metadata: {problem}")
        entries.append(entry)
    if not entries:
        raise UsageError(f"{path} holds no prompts")
    return entries


class GenEval(ddpo.Reward):
    """GenEval's compositional check with OWLv2 and CLIP: partial credit (Flow-GRPO) or GenEval's 0/1 verdict."""

    name = "geneval"

    class Options(ddpo.Options):
        score: Literal["strict", "partial"] = "partial"
        """partial: Flow-GRPO's mean of count, colour and position terms; strict: GenEval's 0/1 verdict."""
        detector: str = "google/owlv2-base-patch16-ensemble"
        """OWLv2 weights and processor: a hub id or a local directory."""
        clip_model: str = "openai/clip-vit-large-patch14"
        """CLIP that names the colour of each object crop (GenEval's: OpenAI's ViT-L/14)."""
        threshold: float = pydantic.Field(0.3, ge=0, le=1)
        """Detections scoring at most this are ignored (GenEval's 0.3)."""
        counting_threshold: float = pydantic.Field(0.3, ge=0, le=1)
        """The same on counting prompts (GenEval's 0.9 is for Mask2Former; OWLv2 scores clear objects lower)."""
        max_objects: int = pydantic.Field(16, ge=1)
        """At most this many objects per class, the most confident (GenEval's 16)."""
        max_overlap: float = pydantic.Field(1.0, gt=0, le=1)
        """A box overlapping a more confident one of its class by IoU >= this is dropped (GenEval's 1: none)."""
        position_threshold: float = pydantic.Field(0.1, ge=0)
        """Margin, in summed box sizes, that centre offsets must exceed for a relation (GenEval's 0.1)."""
        dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
        """dtype of the OWLv2 and CLIP weights (auto: float16 on CUDA, else float32)."""

    def load(self, device):
        import transformers

        from ddpo.plugins.rewards.clip_preprocessing import ClipImagePreprocessor, dtype_kwargs, resolve_dtype

        dtype = resolve_dtype(self.options.dtype, device)
        self.detector = transformers.Owlv2ForObjectDetection.from_pretrained(
            self.options.detector, **dtype_kwargs(dtype)).to(device).eval()
        self.processor = transformers.Owlv2Processor.from_pretrained(self.options.detector)
        self.clip = transformers.CLIPModel.from_pretrained(self.options.clip_model, **dtype_kwargs(dtype)).to(device)
        self.clip.eval()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.options.clip_model)
        self.preprocess = ClipImagePreprocessor.from_pretrained(self.options.clip_model)
        self.color_classifiers = {}
        self.device = device

    def detect(self, images, queries: list[list[str]]) -> list[dict]:
        """OWLv2's detections of `queries` (one list of class names per image) in PIL `images` of one size: the
        processor's post-processed output (scores, labels, boxes in pixels) with every box kept."""
        inputs = self.processor(text=queries, images=images, return_tensors="pt", truncation=True).to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.detector.dtype)
        outputs = self.detector(**inputs)
        side = max(images[0].size)  # OWLv2 pads images to a square: boxes are relative to its side
        return self.processor.image_processor.post_process_object_detection(
            outputs, threshold=0.0, target_sizes=[(side, side)] * len(images))

    def color_classifier(self, class_name: str):
        """(10, D) normalised CLIP text embeddings of GenEval's colours for `class_name`, each the mean of the
        three templates' normalised embeddings (clip_benchmark's zero-shot classifier, as GenEval builds it)."""
        import torch.nn.functional as F

        from ddpo.plugins.rewards.clip_preprocessing import clip_text_embeddings

        if class_name not in self.color_classifiers:
            texts = [template.format(color=color, cls=class_name) for color in COLORS for template in COLOR_TEMPLATES]
            embeddings = F.normalize(clip_text_embeddings(self.clip, self.tokenizer, texts, self.device), dim=-1)
            mean = embeddings.view(len(COLORS), len(COLOR_TEMPLATES), -1).mean(dim=1)
            self.color_classifiers[class_name] = F.normalize(mean, dim=-1)
        return self.color_classifiers[class_name]

    def colors(self, image, detections: list[Detection], class_name: str) -> list[str]:
        """CLIP's colour of each detected object, on its box crop of the PIL `image` (PIL's crop, as GenEval's:
        rounded corners, black outside the image)."""
        import numpy as np
        import torch
        import torch.nn.functional as F

        from ddpo.plugins.rewards.clip_preprocessing import clip_pixel_embeddings

        crops = []
        for detection in detections:
            x0, y0, x1, y1 = (round(value) for value in detection.box)
            crop = np.asarray(image.crop((x0, y0, max(x1, x0 + 1), max(y1, y0 + 1))), dtype=np.float32) / 255
            crops.append(self.preprocess(torch.from_numpy(crop).permute(2, 0, 1)[None].to(self.device)))
        embeddings = F.normalize(clip_pixel_embeddings(self.clip, torch.cat(crops)), dim=-1)
        return [COLORS[index] for index in (embeddings @ self.color_classifier(class_name).T).argmax(dim=-1).tolist()]

    def __call__(self, images, prompts, metadata):
        import torch
        from PIL import Image

        pixels = (images.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        pil_images = [Image.fromarray(array) for array in pixels]
        requests = [prompt_metadata(prompt, meta) for prompt, meta in zip(prompts, metadata, strict=True)]
        queries = [queried_classes(request) for request in requests]
        options, scores = self.options, []
        with torch.no_grad():
            for image, request, classes, found in zip(pil_images, requests, queries, self.detect(pil_images, queries)):
                threshold = options.counting_threshold if request.get("tag") == "counting" else options.threshold
                objects = select_objects(found["boxes"].tolist(), found["scores"].tolist(), found["labels"].tolist(),
                                         classes, threshold, options.max_objects, options.max_overlap)
                for clause in request["include"]:
                    detections = objects.get(clause["class"], [])
                    if "color" in clause and detections and detections[0].color is None:
                        colors = self.colors(image, detections, clause["class"])
                        objects[clause["class"]] = [d._replace(color=c) for d, c in zip(detections, colors)]
                scores.append(SCORES[options.score](objects, request, options.position_threshold))
        return scores


class GenEvalPrompts(ddpo.PromptSet):
    """GenEval prompts with their metadata (objects, counts, colours, positions), for the `geneval` reward."""

    name = "geneval"

    class Options(ddpo.Options):
        path: str = ""
        """A GenEval-format metadata file (JSONL, one prompt a line); empty: the 24 built-in prompts."""

    def __init__(self, options=None):
        super().__init__(options)
        self.entries = read_metadata_file(Path(self.options.path) if self.options.path else BUILTIN_PROMPTS)

    def sample(self, rng: random.Random):
        entry = rng.choice(self.entries)
        return entry["prompt"], copy.deepcopy(entry)


@ddpo.hookimpl
def register_rewards(register):
    register(GenEval)


@ddpo.hookimpl
def register_prompts(register):
    register(GenEvalPrompts)
