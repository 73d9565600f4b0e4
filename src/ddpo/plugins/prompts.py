"""Built-in prompt sets: the DDPO paper's animals, animals doing activities, a file, and none at all."""

from __future__ import annotations

import random
from pathlib import Path

import ddpo
from ddpo.core.configuration.errors import UsageError

SIMPLE_ANIMALS = (
    "cat dog horse monkey rabbit zebra spider bird sheep deer cow goat lion tiger bear raccoon fox wolf lizard "
    "beetle ant butterfly fish shark whale dolphin squirrel mouse rat snake turtle frog chicken duck goose bee "
    "pig turkey fly llama camel bat gorilla hedgehog kangaroo"
).split()
ACTIVITIES = ("washing the dishes", "playing chess", "riding a bike")


class SimpleAnimals(ddpo.PromptSet):
    """The 45 common animals of the DDPO paper, one per prompt ("cat", "dog", ...)."""

    name = "simple_animals"

    def sample(self, rng: random.Random):
        animal = rng.choice(SIMPLE_ANIMALS)
        return animal, {"animal": animal}


def with_article(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


class AnimalActivities(ddpo.PromptSet):
    """The DDPO paper's prompt-alignment set: an animal doing an activity ("a cat playing chess")."""

    name = "animal_activities"

    def sample(self, rng: random.Random):
        animal, activity = rng.choice(SIMPLE_ANIMALS), rng.choice(ACTIVITIES)
        return f"{with_article(animal)} {activity}", {"animal": animal, "activity": activity}


class PromptFile(ddpo.PromptSet):
    """Prompts read from a text file, one per line (blank lines skipped), drawn uniformly."""

    name = "file"

    class Options(ddpo.Options):
        path: str = ""
        """The text file to read prompts from."""

    def __init__(self, options=None):
        super().__init__(options)
        path = Path(self.options.path)
        if not self.options.path or not path.is_file():
            raise UsageError(f"prompts.path='{self.options.path}' is not a file; the 'file' prompt set needs "
                             "--set prompts.path=FILE with one prompt per line")
        self.prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not self.prompts:
            raise UsageError(f"prompt file {path} holds no prompts")

    def sample(self, rng: random.Random):
        return rng.choice(self.prompts), {}


class Unconditional(ddpo.PromptSet):
    """No prompt at all (the empty string), for unconditional models."""

    name = "unconditional"

    def sample(self, rng: random.Random):
        return "", {}


@ddpo.hookimpl
def register_prompts(register):
    for prompt_set in (SimpleAnimals, AnimalActivities, PromptFile, Unconditional):
        register(prompt_set)
