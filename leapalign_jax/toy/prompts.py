"""Prompts of the shapes world: six GenEval-style categories over a finite prompt set.

A prompt asks for exactly the objects it names and nothing else. Templates, with
`{shape}` in square | circle | triangle, `{color}` in red | green | blue | yellow:

| category      | template                                       | the image must show          |
|---------------|------------------------------------------------|------------------------------|
| single_object | "a {shape}"                                    | one object of that shape,    |
|               |                                                | any colour                   |
| two_object    | "a {shape1} and a {shape2}"                    | two objects, those shapes    |
|               |                                                | (distinct), any colours      |
| counting      | "{two,three,four} {color} {shape}s"            | exactly that many objects,   |
|               |                                                | all of that colour and shape |
| colors        | "a {color} {shape}"                            | one object, that colour and  |
|               |                                                | shape                        |
| position      | "a {color1} {shape1} {relation} a {color2}     | those two objects, the first |
|               | {shape2}", relation in "to the left of",       | placed so relative to the    |
|               | "to the right of", "above", "below"            | second                       |
| color_attr    | "a {color1} {shape1} and a {color2} {shape2}"  | those two objects with their |
|               | (colours distinct, shapes distinct)            | colours not swapped          |

Position prompts name two different (colour, shape) objects. A relation holds when the
object centres differ by a margin on its axis (rows grow downwards, so "above" is a
smaller row): sampled scenes keep `SCENE_POSITION_MARGIN` (4) px, the checker asks for
`CHECK_POSITION_MARGIN` (2) px so that a generated image has some slack.

There are 657 prompts (3 single_object, 6 two_object, 36 counting, 12 colors, 528
position, 72 color_attr). They are split deterministically into 526 train and 131
held-out prompts by hashing their text, per category, so every category is in both
(`split`). Held-out prompts are for evaluation only, never for alignment.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
from typing import Any, Mapping, Sequence

import numpy as np

from leapalign_jax.toy import scenes
from leapalign_jax.toy.scenes import COLORS, SHAPES, Scene

CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")
RELATION_TEXT = {"left of": "to the left of", "right of": "to the right of",
                 "above": "above", "below": "below"}
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}
SCENE_POSITION_MARGIN = 4.0
CHECK_POSITION_MARGIN = 2.0
HELDOUT_FRACTION = 0.2


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A structured prompt.

    Attributes:
      category: one of CATEGORIES.
      objects: ((color or None, shape), ...) in the order the text names them; colour is
        None where the prompt leaves it free (single_object, two_object).
      count: counting prompts: how many copies of objects[0]; otherwise 1.
      relation: position prompts: objects[0] <relation> objects[1]; otherwise None.
    """

    category: str
    objects: tuple[tuple[str | None, str], ...]
    count: int = 1
    relation: str | None = None

    @property
    def text(self) -> str:
        (c0, s0), rest = self.objects[0], self.objects[1:]
        if self.category == "single_object":
            return f"a {s0}"
        if self.category == "two_object":
            return f"a {s0} and a {rest[0][1]}"
        if self.category == "counting":
            return f"{COUNT_WORDS[self.count]} {c0} {s0}s"
        if self.category == "colors":
            return f"a {c0} {s0}"
        (c1, s1), = rest
        if self.category == "position":
            return f"a {c0} {s0} {RELATION_TEXT[self.relation]} a {c1} {s1}"
        return f"a {c0} {s0} and a {c1} {s1}"

    @property
    def required(self) -> list[tuple[str | None, str]]:
        """Every object the image must show, with repeats (counting)."""
        return list(self.objects) * self.count


def _enumerate() -> list[Prompt]:
    kinds = list(itertools.product(COLORS, SHAPES))
    out = [Prompt("single_object", ((None, s),)) for s in SHAPES]
    out += [Prompt("two_object", ((None, a), (None, b)))
            for a, b in itertools.permutations(SHAPES, 2)]
    out += [Prompt("counting", ((c, s),), count=n) for n in COUNT_WORDS for c, s in kinds]
    out += [Prompt("colors", ((c, s),)) for c, s in kinds]
    out += [Prompt("position", (a, b), relation=r)
            for a, b in itertools.permutations(kinds, 2) for r in RELATIONS]
    out += [Prompt("color_attr", ((c0, s0), (c1, s1)))
            for (c0, s0), (c1, s1) in itertools.permutations(kinds, 2)
            if c0 != c1 and s0 != s1]
    return out


@functools.lru_cache(maxsize=None)
def all_prompts() -> tuple[Prompt, ...]:
    """The finite prompt set, in a fixed order."""
    return tuple(_enumerate())


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@functools.lru_cache(maxsize=None)
def split() -> tuple[tuple[Prompt, ...], tuple[Prompt, ...]]:
    """(train, held_out): per category, the HELDOUT_FRACTION of prompts (at least one)
    with the smallest sha256 of their text are held out."""
    train, held = [], []
    for cat in CATEGORIES:
        group = sorted((p for p in all_prompts() if p.category == cat),
                       key=lambda p: _hash(p.text))
        n = max(1, round(HELDOUT_FRACTION * len(group)))
        held += group[:n]
        train += group[n:]
    return tuple(train), tuple(held)


def train_prompts() -> tuple[Prompt, ...]:
    return split()[0]


def heldout_prompts() -> tuple[Prompt, ...]:
    return split()[1]


def prompt_by_text(text: str) -> Prompt:
    """The prompt whose text is `text`."""
    table = {p.text: p for p in all_prompts()}
    if text not in table:
        raise ValueError(f"{text!r} is not a shapes-world prompt; see the templates in "
                         "leapalign_jax.toy.prompts")
    return table[text]


def relation_holds(a: tuple[float, float], b: tuple[float, float], relation: str,
                   margin: float) -> bool:
    """Whether centre `a` (col, row) is `relation` of centre `b` by >= `margin` px."""
    if relation == "left of":
        return b[0] - a[0] >= margin
    if relation == "right of":
        return a[0] - b[0] >= margin
    if relation == "above":
        return b[1] - a[1] >= margin
    if relation == "below":
        return a[1] - b[1] >= margin
    raise ValueError(f"unknown relation {relation!r}; use one of {RELATIONS}")


def satisfies(objects: Sequence[Any], prompt: Prompt,
              margin: float = CHECK_POSITION_MARGIN) -> bool:
    """Whether objects (anything with .color, .shape, .center) show exactly the prompt.

    Shared by the image checker (on detected objects) and by the reward's training (on
    scene specs, to know which captions of a batch an image also satisfies).
    """
    required = prompt.required
    if len(objects) != len(required):
        return False
    free = required[0][0] is None  # colours unconstrained

    def key(color, shape):
        return (None if free else color, shape)

    if sorted(map(str, (key(o.color, o.shape) for o in objects))) != sorted(
            map(str, (key(c, s) for c, s in required))):
        return False
    if prompt.relation is None:
        return True
    # Position prompts name two different objects, so the assignment is unique.
    a = next(o for o in objects if (o.color, o.shape) == prompt.objects[0])
    b = next(o for o in objects if (o.color, o.shape) == prompt.objects[1])
    return relation_holds(a.center, b.center, prompt.relation, margin)


def scene_for_prompt(prompt: Prompt, rng: np.random.Generator) -> Scene:
    """A random scene showing exactly the prompt (free colours drawn at random)."""
    kinds = [(COLORS[rng.integers(len(COLORS))] if c is None else c, s)
             for c, s in prompt.required]
    if prompt.relation is None:
        return scenes.place(rng, kinds)
    return scenes.place(rng, kinds, lambda objs: relation_holds(
        objs[0].center, objs[1].center, prompt.relation, SCENE_POSITION_MARGIN))


def sample_prompts(rng: np.random.Generator, n: int, prompts: Sequence[Prompt] | None = None,
                   weights: Mapping[str, float] | None = None) -> list[Prompt]:
    """`n` prompts: a category at random (uniformly, or by `weights`), then a prompt of
    it uniformly.

    Picking the category first keeps the three single_object prompts as frequent as the
    hundreds of position ones.
    """
    prompts = train_prompts() if prompts is None else prompts
    groups = {c: [p for p in prompts if p.category == c] for c in CATEGORIES}
    cats = [c for c in CATEGORIES if groups[c]]
    w = np.array([1.0 if weights is None else weights.get(c, 0.0) for c in cats])
    if not cats or w.sum() <= 0:
        raise ValueError("sample_prompts needs prompts of at least one category with "
                         "positive weight; check `prompts` and `weights`")
    picks = rng.choice(len(cats), size=n, p=w / w.sum())
    return [groups[cats[i]][rng.integers(len(groups[cats[i]]))] for i in picks]


def sample_pairs(rng: np.random.Generator, n: int, prompts: Sequence[Prompt] | None = None,
                 weights: Mapping[str, float] | None = None
                 ) -> tuple[list[Prompt], list[Scene]]:
    """`n` (prompt, scene) pairs for pretraining: prompts from `sample_prompts` (default:
    the train split, categories equally likely) and a random scene satisfying each."""
    chosen = sample_prompts(rng, n, prompts, weights)
    return chosen, [scene_for_prompt(p, rng) for p in chosen]


def hard_negatives(prompt: Prompt) -> list[tuple[str, Prompt]]:
    """Captions that differ from `prompt` in one attribute, as (kind, prompt) pairs.

    Kinds: "color" (one object recoloured), "shape" (one object reshaped), "count"
    (another number), "position" (the opposite relation), "binding" (the two objects'
    colours exchanged). None of them holds for any scene that satisfies `prompt`.
    """
    out: list[tuple[str, Prompt]] = []
    objs = prompt.objects

    def valid(new_objs) -> bool:
        if prompt.category in ("two_object",):
            return new_objs[0][1] != new_objs[1][1]
        if prompt.category == "position":
            return new_objs[0] != new_objs[1]
        if prompt.category == "color_attr":
            return new_objs[0][0] != new_objs[1][0] and new_objs[0][1] != new_objs[1][1]
        return True

    def with_object(i, obj):
        return objs[:i] + (obj,) + objs[i + 1:]

    for i, (c, s) in enumerate(objs):
        if c is not None:
            for c2 in COLORS:
                new = with_object(i, (c2, s))
                if c2 != c and valid(new):
                    out.append(("color", dataclasses.replace(prompt, objects=new)))
        for s2 in SHAPES:
            new = with_object(i, (c, s2))
            if s2 != s and valid(new):
                out.append(("shape", dataclasses.replace(prompt, objects=new)))
    if prompt.category == "counting":
        out += [("count", dataclasses.replace(prompt, count=n))
                for n in COUNT_WORDS if n != prompt.count]
    if prompt.relation is not None:
        out.append(("position", dataclasses.replace(prompt, relation=OPPOSITE[prompt.relation])))
    if len(objs) == 2 and objs[0][0] is not None and objs[0][0] != objs[1][0]:
        new = ((objs[1][0], objs[0][1]), (objs[0][0], objs[1][1]))
        if valid(new):
            out.append(("binding", dataclasses.replace(prompt, objects=new)))
    return out
