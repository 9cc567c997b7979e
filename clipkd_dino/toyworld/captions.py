"""Caption grammar of the toy world: five different captions per scene, lower case, without punctuation.

Every word a caption or a zero-shot prompt can hold comes from the tables below, so `vocabulary_words` is exact.
Each caption names at least one object kind by its canonical noun, and at least one caption per scene names every
kind with its count ("two red stars").
"""

from __future__ import annotations

import numpy as np

from clipkd_dino.toyworld.scene import BACKGROUND_COLOURS, COLOURS, SHAPES, Scene, ToyObject

KINDS: tuple[str, ...] = tuple(SHAPES)
PLURALS: dict[str, str] = {kind: {"cross": "crosses", "fish": "fish"}.get(kind, kind + "s") for kind in KINDS}
COUNT_WORDS = ("one", "two", "three")
# Prompts for zero-shot classification, in the captions' own wording ("{}" is a kind noun; no article before it).
ZEROSHOT_TEMPLATES: tuple[str, ...] = (
    "a photo of one {}",
    "a picture of one {}",
    "a drawing of one {}",
    "an image of one {}",
    "a sketch of a single {}",
    "a single {}",
    "one {}",
    "there is one {}",
)

LEADS = ("a photo of", "a picture of", "a drawing of", "an image of", "a sketch of")
DETERMINERS = ("a", "a", "a", "one", "a single")  # of a lone object; "a" becomes "an" before a vowel
GROUP_DETERMINERS = ("a", "a", "a", "one")  # of one object among others
BACKDROP_PREPOSITIONS = ("on", "against")
SIZE_SYNONYMS = {"small": ("small",), "medium": (), "big": ("big", "large")}
JOINERS = ("and", "with")  # between the first and second of three groups; the last is always "and"
RELATIONS = {
    "left": ("to the left of",),
    "right": ("to the right of",),
    "above": ("above", "over"),
    "below": ("below", "under"),
    "near": ("next to", "beside", "near"),
}
POSITIONS = {  # (horizontal, vertical) third of the image holding the object's centre
    ("center", "middle"): ("in the center", "in the middle"),
    ("left", "middle"): ("on the left",),
    ("right", "middle"): ("on the right",),
    ("center", "top"): ("at the top",),
    ("center", "bottom"): ("at the bottom",),
    ("left", "top"): ("in the top left corner", "at the top left"),
    ("right", "top"): ("in the top right corner", "at the top right"),
    ("left", "bottom"): ("in the bottom left corner", "at the bottom left"),
    ("right", "bottom"): ("in the bottom right corner", "at the bottom right"),
}
BACKGROUND_PHRASES = {  # {0}, {1}: background colour names
    "plain": ("a {0} background", "a plain {0} background"),
    "gradient": ("a gradient background", "a {0} and {1} gradient background"),
    "noisy": ("a noisy {0} background",),
    "textured": ("a textured {0} background", "a {0} textured background"),
}
SINGLE_FRAMES = (
    "{lead} {obj}",
    "{obj}",
    "{obj} {on} {bg}",
    "{lead} {obj} {on} {bg}",
    "{obj} {pos}",
    "{lead} {obj} {pos}",
    "there is {obj}",
    "there is {obj} {pos}",
    "the {noun} is {colour}",
    "{colour} {noun} {on} {bg}",
)
MULTI_FRAMES = (
    "{lead} {objs}",
    "{objs}",
    "{objs} {on} {bg}",
    "{lead} {objs} {on} {bg}",
    "there {be} {objs}",
    "{a} {rel} {b}",
    "{lead} {a} {rel} {b}",
    "the {noun_a} is {rel} the {noun_b}",
)
CAPTIONS_PER_IMAGE = 5
_COLOUR_P = 0.8  # how often a noun phrase names the colour
_SIZE_P = 0.35  # how often it names a small or big size


def vocabulary_words() -> list[str]:
    """Every word the caption grammar and the zero-shot templates can produce, lower case, sorted."""
    texts = [
        *ZEROSHOT_TEMPLATES,
        *LEADS,
        *DETERMINERS,
        "an",
        *BACKDROP_PREPOSITIONS,
        *COUNT_WORDS,
        *JOINERS,
        "is are",
        *KINDS,
        *PLURALS.values(),
        *COLOURS,
        *BACKGROUND_COLOURS,
        *(word for words in SIZE_SYNONYMS.values() for word in words),
        *(phrase for phrases in RELATIONS.values() for phrase in phrases),
        *(phrase for phrases in POSITIONS.values() for phrase in phrases),
        *(phrase for phrases in BACKGROUND_PHRASES.values() for phrase in phrases),
        *SINGLE_FRAMES,
        *MULTI_FRAMES,
    ]
    return sorted({word for text in texts for word in text.split() if not word.startswith("{")})


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[rng.integers(len(options))]


def _with_articles(text: str) -> str:
    """Turn "a" into "an" before a vowel (every word of this grammar follows the spelling rule)."""
    words = text.split()
    for i, word in enumerate(words[:-1]):
        if word in ("a", "an"):
            words[i] = "an" if words[i + 1][0] in "aeiou" else "a"
    return " ".join(words)


def _object_phrase(
    rng: np.random.Generator, obj: ToyObject, determiners: tuple[str, ...], colour_p: float = _COLOUR_P
) -> str:
    words = [_pick(rng, determiners)]
    if SIZE_SYNONYMS[obj.size] and rng.random() < _SIZE_P:
        words.append(_pick(rng, SIZE_SYNONYMS[obj.size]))
    if rng.random() < colour_p:
        words.append(obj.colour)
    words.append(obj.kind)
    return " ".join(words)


def _groups(scene: Scene) -> dict[str, list[ToyObject]]:
    """Objects by kind, in order of first appearance."""
    groups: dict[str, list[ToyObject]] = {}
    for obj in scene.objects:
        groups.setdefault(obj.kind, []).append(obj)
    return groups


def _objects_phrase(rng: np.random.Generator, scene: Scene) -> tuple[str, str]:
    """("two red stars and a fish", the verb that agrees with the first group: "is" or "are")."""
    groups = _groups(scene)
    phrases = []
    for kind, objects in groups.items():
        if len(objects) == 1:
            phrases.append(_object_phrase(rng, objects[0], GROUP_DETERMINERS))
            continue
        words = [COUNT_WORDS[len(objects) - 1]]
        if len({o.colour for o in objects}) == 1 and rng.random() < _COLOUR_P:
            words.append(objects[0].colour)
        phrases.append(" ".join([*words, PLURALS[kind]]))
    if len(phrases) == 3:
        text = f"{phrases[0]} {_pick(rng, JOINERS)} {phrases[1]} and {phrases[2]}"
    else:
        text = " and ".join(phrases)
    return text, "is" if len(next(iter(groups.values()))) == 1 else "are"


def _centre(obj: ToyObject) -> tuple[float, float]:
    x0, y0, x1, y1 = obj.extent
    return (x0 + x1) / 2, (y0 + y1) / 2


def _relation(a: ToyObject, b: ToyObject) -> str:
    """Where `a` is relative to `b`: a key of RELATIONS ("near" when neither axis clearly dominates)."""
    (ax, ay), (bx, by) = _centre(a), _centre(b)
    dx, dy = ax - bx, ay - by
    if abs(dx) >= 1.5 * abs(dy):
        return "left" if dx < 0 else "right"
    if abs(dy) >= 1.5 * abs(dx):
        return "above" if dy < 0 else "below"
    return "near"


def _position(obj: ToyObject, size: int) -> tuple[str, str]:
    x, y = _centre(obj)
    horizontal = "left" if x < 0.4 * size else "right" if x > 0.6 * size else "center"
    vertical = "top" if y < 0.4 * size else "bottom" if y > 0.6 * size else "middle"
    return horizontal, vertical


def _slots(rng: np.random.Generator, scene: Scene) -> dict[str, str]:
    """Random fillers for every slot of the frames that fit this scene."""
    background = scene.background
    slots = {
        "lead": _pick(rng, LEADS),
        "on": _pick(rng, BACKDROP_PREPOSITIONS),
        "bg": _pick(rng, BACKGROUND_PHRASES[background.style]).format(*background.colours),
    }
    if len(scene.objects) == 1:
        obj = scene.objects[0]
        slots.update(
            obj=_object_phrase(rng, obj, DETERMINERS),
            noun=obj.kind,
            colour=obj.colour,
            pos=_pick(rng, POSITIONS[_position(obj, scene.size)]),
        )
        return slots
    first, second = (scene.objects[i] for i in rng.permutation(len(scene.objects))[:2])
    relation = "near" if rng.random() < 0.2 else _relation(first, second)
    colour_p = 1.0 if first.kind == second.kind else _COLOUR_P  # not "a star next to a star"
    slots["objs"], slots["be"] = _objects_phrase(rng, scene)
    slots.update(
        a=_object_phrase(rng, first, ("a",), colour_p),
        b=_object_phrase(rng, second, ("a",), colour_p),
        rel=_pick(rng, RELATIONS[relation]),
        noun_a=first.kind,
        noun_b=second.kind,
    )
    return slots


def _frames(scene: Scene) -> tuple[list[str], list[str]]:
    """(frames that fit the scene, those of them that name every kind with its count)."""
    if len(scene.objects) == 1:
        return list(SINGLE_FRAMES), list(SINGLE_FRAMES)
    frames = list(MULTI_FRAMES)
    if max(len(objects) for objects in _groups(scene).values()) > 1:
        # "the star is ... the fish" needs each of the two kinds once; the pair is drawn per caption, so drop it.
        frames.remove("the {noun_a} is {rel} the {noun_b}")
    return frames, [f for f in frames if "{objs}" in f]


def make_captions(rng: np.random.Generator, scene: Scene) -> list[str]:
    """Five different captions from five different frames; at least one names every kind with its count."""
    frames, complete = _frames(scene)
    order = [frames[i] for i in rng.permutation(len(frames))]
    if not any(frame in complete for frame in order[:CAPTIONS_PER_IMAGE]):
        spare = next(i for i, frame in enumerate(order) if frame in complete)
        slot = int(rng.integers(CAPTIONS_PER_IMAGE))
        order[spare], order[slot] = order[slot], order[spare]
    captions: list[str] = []
    for frame in order:
        for _ in range(10):
            caption = _with_articles(frame.format(**_slots(rng, scene)))
            if caption not in captions:
                captions.append(caption)
                break
        if len(captions) == CAPTIONS_PER_IMAGE:
            return captions
    raise RuntimeError(f"the caption grammar produced fewer than {CAPTIONS_PER_IMAGE} different captions")
