"""ShapesWorld: a procedural, seeded video question-answering set.

A clip shows 2-5 flat shapes on a dark background. Each object is a shape x colour x size,
moves in a straight line (left, right, up, down) or stays still, may appear late, leave
early or live only 2-3 frames, may pass under a bigger object (occlusion, by depth order), and
may carry a fine detail: a 3-5 px dot of another colour at its centre that flashes for 2-3
frames, visible only at full resolution and only in that moment.

Every question is computed from the scene state (`Scene`), never from pixels, and is
answered by one word chosen from multiple-choice candidates. The set is built so that a model
keeping one token per frame (or per video) cannot solve it:

- several objects share each frame, and most questions name one of them, so a pooled token
  that mixes all their colours and shapes loses which attribute belongs to which object;
- candidates are drawn first from the other objects in the same scene, so knowing which
  colours or shapes are present is not enough: the answer must be bound to the named object;
- `fine_detail` asks the colour of a 25-pixel dot on a 128 px frame, which 4x spatial pooling
  averages away and which shows in only 2-3 of 16 frames, so keeping one frame in four
  misses it a third of the time;
- `temporal_order` and `position` ask about one moment (which object appears first; where an
  object is when it appears), objects may live for only 2-3 of 16 frames, and half the
  temporal questions (when the scene allows) are won by such a brief object, so dropping
  frames or averaging over time loses the answer;
- `instruction` questions name one of several similar objects by a second property
  ("What colour is the big circle?" when there are two circles of different colours).

Attribute and `counting` questions are the other side: their answer is spread over every frame
their objects live in (a count is always "in the video", never "at the end"), so a compressor
that drops tokens at random should cost them little; the benchmark reports both sides.

The vocabulary stays small (5 shapes, 7 colours, 2 sizes, 5 directions, 4 quadrants, number
words), so a tiny model can learn it on a CPU.

Usage:
    scene, questions = scene_and_questions("train", 0)
    frames = render(scene)                          # uint8 [T, H, W, 3]
    frames, object_ids = render_with_labels(scene)  # object_ids: int16 [T, H, W], -1 = background
    write_split("test", 200, "data/shapesworld/test")  # mp4 clips + manifest.json

    python -m eval.shapesworld --split test --count 200 --out data/shapesworld/test
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path

import numpy as np

# ---------------------------------------------------------------- vocabulary

SHAPES = ("circle", "square", "triangle", "cross", "diamond")
SHAPE_PLURALS = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "cross": "crosses",
    "diamond": "diamonds",
}
COLOURS_RGB = {
    "red": (220, 40, 40),
    "green": (40, 190, 70),
    "blue": (50, 100, 240),
    "yellow": (235, 215, 40),
    "purple": (150, 70, 210),
    "orange": (245, 140, 30),
    "white": (235, 235, 235),
}
COLOURS = tuple(COLOURS_RGB)
SIZES = ("small", "big")
DIRECTIONS = ("left", "right", "up", "down", "still")
QUADRANTS = ("top-left", "top-right", "bottom-left", "bottom-right")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
QUESTION_TYPES = (
    "attribute",
    "counting",
    "motion",
    "temporal_order",
    "position",
    "fine_detail",
    "instruction",
)

# (colour, shape) pairs that never appear in train/val/test scenes and always appear, as the
# object asked about, in compositional scenes. Each colour and shape still occurs in training.
COMPOSITIONAL_PAIRS = (
    ("red", "triangle"),
    ("green", "diamond"),
    ("blue", "cross"),
    ("yellow", "square"),
    ("purple", "circle"),
)

# Clip seeds: split k owns [k * 10**9, (k + 1) * 10**9), so no two splits share a seed.
SPLITS = ("train", "val", "test", "compositional", "samples")
_SEEDS_PER_SPLIT = 10**9

_DIRECTION_UNIT = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}
_OCCLUSION_PROBABILITY = 0.4
_MAX_SCENE_DRAWS = 200
# An object counts as seen in a frame when at least this share of its area is uncovered.
_SEEN_FRACTION = 0.5
# Bumped whenever the same seed may draw a different scene or question: caches of rendered or
# encoded clips (eval.train_tiny.encode_pool_cached) key on it. 2: flashing dots, brief objects.
# 3: counts over the whole clip only (the scenes are v2's; the questions after a count differ).
# 4: v3's counts, with v2's draws kept (`_draw_moment`), so only the counting questions differ from v2.
GENERATOR_VERSION = 4
# A dot flashes for 2-3 consecutive frames and a brief object lives 2-3 frames, so keeping one
# frame in four (`uniform:every=4`) misses a third of them: the answer lives in one moment.
DOT_FLASH_FRAMES = (2, 3)
BRIEF_LIFE_FRAMES = (2, 3)
_BRIEF_TEMPORAL_SHARE = 0.5


# ---------------------------------------------------------------- config


@dataclass(frozen=True)
class ShapesWorldConfig:
    """How clips look. Sizes scale with `frame_size_px`; timings with `frame_count`."""

    frame_count: int = 16
    frame_size_px: int = 128  # frames are square
    fps: int = 8
    min_objects: int = 2
    max_objects: int = 5
    min_visible_frames: int = 3  # the shortest life of an object that appears late or leaves early (not brief)

    def __post_init__(self) -> None:
        if not 8 <= self.frame_count <= 32:
            raise ValueError(f"frame_count must be in [8, 32], got {self.frame_count}")
        if not 64 <= self.frame_size_px <= 128:
            raise ValueError(f"frame_size_px must be in [64, 128], got {self.frame_size_px}")
        if not 1 <= self.min_objects <= self.max_objects <= len(NUMBER_WORDS) - 1:
            raise ValueError(f"need 1 <= min_objects <= max_objects <= 6, got {self.min_objects}, {self.max_objects}")
        if not 2 <= self.min_visible_frames <= self.frame_count // 2:
            raise ValueError(f"min_visible_frames must be in [2, frame_count / 2], got {self.min_visible_frames}")

    @classmethod
    def from_name(cls, name: str) -> ShapesWorldConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown ShapesWorld preset {name!r}; choose from {sorted(PRESETS)}")
        return PRESETS[name]

    def radius_px(self, size: str) -> float:
        return (0.1 if size == "big" else 0.055) * self.frame_size_px

    @property
    def dot_size_px(self) -> int:
        """Side of the square fine-detail dot: 5 px at 128 px frames, 3 px at 64 px (a fifth to
        a third of a 16 px patch: small enough that pooling tokens loses it, big enough that a
        patch embedding can see it)."""
        return 5 if self.frame_size_px >= 96 else 3


PRESETS = {
    "default": ShapesWorldConfig(),
    "tiny": ShapesWorldConfig(frame_count=8, frame_size_px=64),
    "long": ShapesWorldConfig(frame_count=32),
}
DEFAULT_CONFIG = PRESETS["default"]


# ---------------------------------------------------------------- scene state


@dataclass(frozen=True)
class SceneObject:
    object_id: int  # index in `Scene.objects` and its value in the label map
    shape: str
    colour: str
    size: str
    radius_px: float
    direction: str  # one of DIRECTIONS; motion is linear at constant speed
    first_frame: int  # first frame it is present in, inclusive
    last_frame: int  # last frame it is present in, inclusive
    depth: int  # draw order: a higher depth is drawn later, on top
    dot_colour: str | None  # colour of the fine-detail dot at its centre, if it has one
    dot_frames: tuple[int, int] | None = None  # (first, last) frames the dot flashes in, inclusive


@dataclass(frozen=True, eq=False)
class Scene:
    """The full state of one clip; `render` draws it and questions are computed from it."""

    config: ShapesWorldConfig
    background_rgb: tuple[int, int, int]
    objects: tuple[SceneObject, ...]
    centres_px: np.ndarray  # [N, T, 2] float (x, y) in pixels; NaN where the object is absent
    present: np.ndarray  # [N, T] bool, True inside [first_frame, last_frame]
    visible_fraction: np.ndarray  # [N, T] float, share of its area not covered by objects above
    dot_visible: np.ndarray  # [N, T] bool, its whole dot is uncovered in that frame
    focus_object_id: int | None = None  # compositional scenes: the object with a held-out pair

    def seen(self, object_id: int) -> np.ndarray:
        """[T] bool: frames where the object is present and at least half uncovered."""
        return self.present[object_id] & (self.visible_fraction[object_id] >= _SEEN_FRACTION)


def make_scene(
    rng: np.random.Generator, config: ShapesWorldConfig = DEFAULT_CONFIG, *, compositional: bool = False
) -> Scene:
    """Draw a scene in which every object and every dot can actually be seen.

    Draws are rejected (and redrawn from the same `rng`, so the result stays deterministic)
    until each object is at least half uncovered in its first and last frame and in at least
    two frames. Dots hidden in all but one frame are removed. With `compositional`, object 0
    has a held-out (colour, shape) pair; otherwise no object has one.
    """
    for _ in range(_MAX_SCENE_DRAWS):
        objects, centres_px = _draw_objects(rng, config, compositional)
        background_rgb = tuple(int(v) for v in rng.integers(8, 40, size=3))
        scene = _measure_visibility(config, background_rgb, objects, centres_px, 0 if compositional else None)
        if _every_object_is_seen(scene):
            return _without_hidden_dots(scene)
    raise RuntimeError(f"no readable ShapesWorld scene in {_MAX_SCENE_DRAWS} draws for {config}")


def _draw_objects(
    rng: np.random.Generator, config: ShapesWorldConfig, compositional: bool
) -> tuple[list[SceneObject], np.ndarray]:
    count = int(rng.integers(config.min_objects, config.max_objects + 1))
    looks = _draw_looks(rng, count, compositional)
    centres_px = np.full((count, config.frame_count, 2), np.nan)  # [N, T, 2]
    objects = []
    for object_id, (shape, colour, size) in enumerate(looks):
        radius_px = config.radius_px(size)
        first_frame, last_frame = _draw_lifetime(rng, config)
        direction = _choose(rng, DIRECTIONS)
        centres_px[object_id, first_frame : last_frame + 1] = _draw_path(
            rng, config, radius_px, direction, last_frame - first_frame
        )
        has_dot = rng.random() < (0.75 if compositional and object_id == 0 else 0.5)
        dot_colour = _choose(rng, [c for c in COLOURS if c != colour]) if has_dot else None
        dot_frames = _draw_dot_frames(rng, first_frame, last_frame) if has_dot else None
        objects.append(SceneObject(
            object_id, shape, colour, size, radius_px, direction, first_frame, last_frame, 0, dot_colour, dot_frames
        ))
    if all(o.dot_colour is None for o in objects):
        lucky = 0 if compositional else int(rng.integers(count))
        dot_colour = _choose(rng, [c for c in COLOURS if c != objects[lucky].colour])
        dot_frames = _draw_dot_frames(rng, objects[lucky].first_frame, objects[lucky].last_frame)
        objects[lucky] = replace(objects[lucky], dot_colour=dot_colour, dot_frames=dot_frames)
    # Big objects are drawn over small ones, so occlusion is a big object covering a small one.
    draw_order = sorted(range(count), key=lambda i: (objects[i].size == "big", rng.random()))
    for depth, object_id in enumerate(draw_order):
        objects[object_id] = replace(objects[object_id], depth=depth)
    if rng.random() < _OCCLUSION_PROBABILITY:
        _stage_occlusion(rng, objects, centres_px)
    return objects, centres_px


def _draw_looks(rng: np.random.Generator, count: int, compositional: bool) -> list[tuple[str, str, str]]:
    """(shape, colour, size) per object, all distinct. Shapes and colours are drawn
    independently, so scenes often hold two circles or two red objects (instruction questions)."""
    held_out = set(COMPOSITIONAL_PAIRS)
    looks: list[tuple[str, str, str]] = []
    while len(looks) < count:
        if compositional and not looks:
            colour, shape = _choose(rng, COMPOSITIONAL_PAIRS)
        else:
            shape, colour = _choose(rng, SHAPES), _choose(rng, COLOURS)
            if (colour, shape) in held_out:
                continue
        look = (shape, colour, _choose(rng, SIZES))
        if look not in looks:
            looks.append(look)
    return looks


def _draw_dot_frames(rng: np.random.Generator, first_frame: int, last_frame: int) -> tuple[int, int]:
    """(first, last) frames of the dot's flash: `DOT_FLASH_FRAMES` consecutive frames of the
    object's life (all of it when it lives no longer), so the dot is a detail of one moment."""
    length = min(int(rng.integers(DOT_FLASH_FRAMES[0], DOT_FLASH_FRAMES[1] + 1)), last_frame - first_frame + 1)
    start = int(rng.integers(first_frame, last_frame - length + 2))
    return start, start + length - 1


def _draw_lifetime(rng: np.random.Generator, config: ShapesWorldConfig) -> tuple[int, int]:
    """(first_frame, last_frame): present all along, appearing late, leaving early, or brief
    (`BRIEF_LIFE_FRAMES`, somewhere after the first frame)."""
    last_index, shortest = config.frame_count - 1, config.min_visible_frames
    kind = rng.random()
    if kind < 0.25:  # appears late
        return int(rng.integers(1, config.frame_count - shortest + 1)), last_index
    if kind < 0.4:  # leaves early
        return 0, int(rng.integers(shortest - 1, last_index))
    if kind < 0.6:  # brief: appears late and leaves early
        length = int(rng.integers(BRIEF_LIFE_FRAMES[0], BRIEF_LIFE_FRAMES[1] + 1))
        first_frame = int(rng.integers(1, config.frame_count - length))
        return first_frame, first_frame + length - 1
    return 0, last_index


def _draw_path(
    rng: np.random.Generator, config: ShapesWorldConfig, radius_px: float, direction: str, steps: int
) -> np.ndarray:
    """[steps + 1, 2] centres (x, y) of a straight path that keeps the object inside the frame.

    A moving object travels at least 15% of the frame over its life, so its direction reads
    clearly even when it lives only 3 frames."""
    size_px = config.frame_size_px
    low_px, high_px = radius_px + 1, size_px - radius_px - 1
    if direction == "still":
        return np.tile(rng.uniform(low_px, high_px, size=2), (steps + 1, 1))
    # An object present all clip long crosses 20-50% of the frame, whatever the frame count.
    speed_px = max(rng.uniform(0.2, 0.5) * size_px / config.frame_count, 0.15 * size_px / steps)
    travel_px = min(speed_px * steps, high_px - low_px)
    along_start_px = low_px + rng.random() * max(high_px - low_px - travel_px, 0.0)
    across_px = rng.uniform(low_px, high_px)
    unit_x, unit_y = _DIRECTION_UNIT[direction]
    progress_px = np.linspace(0.0, travel_px, steps + 1)
    along_px = along_start_px + (progress_px if unit_x + unit_y > 0 else travel_px - progress_px)
    if unit_x:
        return np.stack([along_px, np.full_like(along_px, across_px)], axis=1)
    return np.stack([np.full_like(along_px, across_px), along_px], axis=1)


def _stage_occlusion(rng: np.random.Generator, objects: list[SceneObject], centres_px: np.ndarray) -> None:
    """Park a small object on the path of a big moving one, half-way through their shared time."""
    pairs = [
        (big, small)
        for big in objects
        for small in objects
        if big.size == "big"
        and big.direction != "still"
        and small.size == "small"
        and min(big.last_frame, small.last_frame) - max(big.first_frame, small.first_frame) >= 2
    ]
    if not pairs:
        return
    big, small = pairs[int(rng.integers(len(pairs)))]
    meeting_frame = (max(big.first_frame, small.first_frame) + min(big.last_frame, small.last_frame)) // 2
    centres_px[small.object_id, small.first_frame : small.last_frame + 1] = centres_px[big.object_id, meeting_frame]
    objects[small.object_id] = replace(small, direction="still")


def _measure_visibility(
    config: ShapesWorldConfig,
    background_rgb: tuple[int, int, int],
    objects: Sequence[SceneObject],
    centres_px: np.ndarray,
    focus_object_id: int | None,
) -> Scene:
    present = ~np.isnan(centres_px[..., 0])  # [N, T]
    scene = Scene(
        config,
        background_rgb,
        tuple(objects),
        centres_px,
        present,
        visible_fraction=np.zeros(present.shape),
        dot_visible=np.zeros(present.shape, bool),
        focus_object_id=focus_object_id,
    )
    _, object_ids, area_px = _rasterise(scene)
    count = len(objects)
    visible_px = np.stack([np.bincount(frame.ravel() + 1, minlength=count + 1)[1:] for frame in object_ids], axis=1)
    visible_fraction = np.where(area_px > 0, visible_px / np.maximum(area_px, 1), 0.0)  # [N, T]
    dot_visible = np.zeros(present.shape, bool)
    for obj in objects:
        if obj.dot_colour is None:
            continue
        for t in np.flatnonzero(present[obj.object_id] & _dot_shown(obj, len(present[obj.object_id]))):
            rows, cols = dot_box_px(scene, obj.object_id, int(t))
            dot_visible[obj.object_id, t] = bool((object_ids[t, rows, cols] == obj.object_id).all())
    return replace(scene, visible_fraction=visible_fraction, dot_visible=dot_visible)


def _dot_shown(obj: SceneObject, frame_count: int) -> np.ndarray:
    """[T] bool: frames in the object's dot flash."""
    frames = np.arange(frame_count)
    return (frames >= obj.dot_frames[0]) & (frames <= obj.dot_frames[1])


def _every_object_is_seen(scene: Scene) -> bool:
    for obj in scene.objects:
        seen = scene.seen(obj.object_id)
        if seen.sum() < 2 or not (seen[obj.first_frame] and seen[obj.last_frame]):
            return False
    return True


def _without_hidden_dots(scene: Scene) -> Scene:
    objects = tuple(
        replace(o, dot_colour=None, dot_frames=None)
        if o.dot_colour and scene.dot_visible[o.object_id].sum() < 2 else o
        for o in scene.objects
    )
    dot_visible = scene.dot_visible & np.array([o.dot_colour is not None for o in objects])[:, None]
    return replace(scene, objects=objects, dot_visible=dot_visible)


# ---------------------------------------------------------------- rendering


def render(scene: Scene) -> np.ndarray:
    """uint8 [T, H, W, 3] RGB frames of the scene."""
    return _rasterise(scene)[0]


def render_with_labels(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """Frames uint8 [T, H, W, 3] and which object covers each pixel, int16 [T, H, W]
    (`object_id`, or -1 for background). A dot's pixels belong to the object carrying it."""
    frames, object_ids, _ = _rasterise(scene)
    return frames, object_ids


def dot_box_px(scene: Scene, object_id: int, frame_index: int) -> tuple[slice, slice]:
    """(rows, cols) slices of the square dot at the object's centre in one frame."""
    side_px = scene.config.dot_size_px
    x_px, y_px = scene.centres_px[object_id, frame_index]
    top, left = int(np.floor(y_px)) - side_px // 2, int(np.floor(x_px)) - side_px // 2
    return slice(top, top + side_px), slice(left, left + side_px)


def _rasterise(scene: Scene) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Frames [T, H, W, 3], object ids [T, H, W] and each object's full area in px [N, T]."""
    count, frame_count = scene.present.shape
    size_px = scene.config.frame_size_px
    frames = np.empty((frame_count, size_px, size_px, 3), np.uint8)
    frames[:] = scene.background_rgb
    object_ids = np.full((frame_count, size_px, size_px), -1, np.int16)
    area_px = np.zeros((count, frame_count), np.int64)
    for obj in sorted(scene.objects, key=lambda o: o.depth):
        for t in np.flatnonzero(scene.present[obj.object_id]):
            x_px, y_px = scene.centres_px[obj.object_id, t]
            reach_px = obj.radius_px + 1
            left, right = max(int(x_px - reach_px), 0), min(int(x_px + reach_px) + 1, size_px)
            top, bottom = max(int(y_px - reach_px), 0), min(int(y_px + reach_px) + 1, size_px)
            dx = np.arange(left, right) + 0.5 - x_px  # [w] pixel centres relative to the object
            dy = np.arange(top, bottom) + 0.5 - y_px  # [h]
            mask = _shape_mask(obj.shape, dx[None, :], dy[:, None], obj.radius_px)  # [h, w]
            area_px[obj.object_id, t] = mask.sum()
            object_ids[t, top:bottom, left:right][mask] = obj.object_id
            frames[t, top:bottom, left:right][mask] = COLOURS_RGB[obj.colour]
            if obj.dot_colour is not None and obj.dot_frames[0] <= t <= obj.dot_frames[1]:
                # Only where the object itself was just drawn, so a dot never grows the shape.
                rows, cols = dot_box_px(scene, obj.object_id, int(t))
                on_object = object_ids[t, rows, cols] == obj.object_id
                frames[t, rows, cols][on_object] = COLOURS_RGB[obj.dot_colour]
    return frames, object_ids, area_px


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, radius: float) -> np.ndarray:
    """Which offsets (dx [1, w], dy [h, 1], y pointing down) fall inside the shape -> [h, w]."""
    if shape == "circle":
        return dx * dx + dy * dy <= radius * radius
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.8 * radius
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= radius
    if shape == "triangle":  # apex up, centroid at the centre
        return (dy <= 0.5 * radius) & (np.abs(dx) <= 0.577 * (dy + radius))
    if shape == "cross":
        arm, reach = 0.35 * radius, 0.9 * radius
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= reach)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= reach))
    raise ValueError(f"unknown shape {shape!r}")


# ---------------------------------------------------------------- questions


@dataclass(frozen=True)
class Question:
    text: str
    candidates: tuple[str, ...]  # shuffled; the answer is one of them
    answer: str  # one word
    type: str  # one of QUESTION_TYPES
    object_ids: tuple[int, ...]  # the objects the question is about (temporal order: the answer first)
    frame_index: int | None = None  # the one frame the answer lives in, when there is one


def make_questions(scene: Scene, rng: np.random.Generator, *, moment_counts: bool = False) -> list[Question]:
    """At most one question of each type, in QUESTION_TYPES order; a type the scene cannot
    support unambiguously is skipped. In compositional scenes every question is about the
    focus object (counting and temporal order include it). `moment_counts`: about half the
    counts ask about the first or last frame, as in v2 (see `_ask_counting`); the same draws
    either way, so only those counts differ."""
    askers = (
        _ask_attribute,
        functools.partial(_ask_counting, moment_counts=moment_counts),
        _ask_motion,
        _ask_temporal_order,
        _ask_position,
        _ask_fine_detail,
        _ask_instruction,
    )
    questions = [ask(scene, rng) for ask in askers]
    return [question for question in questions if question is not None]


# A name is a set of attributes; these are tried shortest first to name an object uniquely.
_STATIC_NAMINGS = (
    ("shape",),
    ("colour",),
    ("size", "shape"),
    ("colour", "shape"),
    ("size", "colour"),
    ("size", "colour", "shape"),
)
# Two-attribute names for instruction questions: a head word shared by several objects
# (shape or colour) and a second property that singles one out.
_INSTRUCTION_NAMINGS = (
    ("size", "shape"),
    ("colour", "shape"),
    ("shape", "direction"),
    ("size", "colour"),
    ("colour", "direction"),
)
_ASK_TEMPLATES = {
    "colour": "What colour is the {name}?",
    "shape": "What shape is the {name}?",
    "direction": "Which direction does the {name} move?",
}
_VOCABULARY = {"colour": COLOURS, "shape": SHAPES, "direction": DIRECTIONS}


def _targets(scene: Scene) -> list[SceneObject]:
    if scene.focus_object_id is None:
        return list(scene.objects)
    return [scene.objects[scene.focus_object_id]]


def _matching(scene: Scene, attributes: dict[str, str]) -> list[SceneObject]:
    return [o for o in scene.objects if all(getattr(o, key) == value for key, value in attributes.items())]


def _name_of(obj: SceneObject, naming: Sequence[str]) -> dict[str, str]:
    return {key: getattr(obj, key) for key in naming}


def _name_text(attributes: dict[str, str]) -> str:
    """{"size": "big", "shape": "circle"} -> "big circle"; without a shape the noun is "object"."""
    words = [attributes[key] for key in ("size", "colour") if key in attributes]
    words.append(attributes.get("shape", "object"))
    if "direction" in attributes:
        words += ["moving", attributes["direction"]]
    return " ".join(words)


def _is_unique(scene: Scene, attributes: dict[str, str]) -> bool:
    return len(_matching(scene, attributes)) == 1


def _shortest_unique_name(scene: Scene, obj: SceneObject) -> dict[str, str] | None:
    for naming in _STATIC_NAMINGS:
        if _is_unique(scene, _name_of(obj, naming)):
            return _name_of(obj, naming)
    return None


def _ask_about(
    scene: Scene, rng: np.random.Generator, obj: SceneObject, naming: Sequence[str], asked: str, kind: str
) -> Question:
    """A colour / shape / direction question about one object named by `naming`."""
    answer = getattr(obj, asked)
    others_in_scene = [getattr(o, asked) for o in scene.objects]
    return Question(
        text=_ASK_TEMPLATES[asked].format(name=_name_text(_name_of(obj, naming))),
        candidates=_candidates(rng, answer, others_in_scene, _VOCABULARY[asked]),
        answer=answer,
        type=kind,
        object_ids=(obj.object_id,),
    )


def _ask_attribute(scene: Scene, rng: np.random.Generator) -> Question | None:
    """"What colour is the triangle?" / "What shape is the red object?" (one-word names)."""
    options = [
        (obj, (naming,), asked)
        for obj in _targets(scene)
        for naming, asked in (("shape", "colour"), ("colour", "shape"))
        if _is_unique(scene, _name_of(obj, (naming,)))
    ]
    if not options:
        return None
    obj, naming, asked = options[int(rng.integers(len(options)))]
    return _ask_about(scene, rng, obj, naming, asked, "attribute")


def _ask_counting(scene: Scene, rng: np.random.Generator, moment_counts: bool = False) -> Question | None:
    """"How many red objects appear in the video?": a count over the whole clip.

    The benchmark never counts at one moment ("... at the end?", v2): the answer of a count is
    spread over every frame its objects live in, so dropping tokens at random leaves it in view
    (issue 3 asks counting to survive `random`), while the questions whose answer lives in one
    moment are position, fine detail and temporal order. With `moment_counts` (training only:
    eval.train_tiny's stage 2, where counting within one frame is more to learn from), the
    moment v2 drew is asked about, so these are v2's questions."""
    targets = _targets(scene)
    # Counting everything and preferring shared colours / shapes keeps "one" from dominating.
    filter_kinds = ["all", "all", "colour", "shape"] if scene.focus_object_id is None else ["colour", "shape"]
    kind = _choose(rng, filter_kinds)
    attributes = {}
    if kind != "all":
        values = sorted({getattr(o, kind) for o in targets})
        shared = [v for v in values if len(_matching(scene, {kind: v})) >= 2]
        attributes = {kind: _choose(rng, shared if shared and rng.random() < 0.6 else values)}
    moment = _draw_moment(scene, rng)  # drawn either way, to keep the questions after it v2's
    if not moment_counts:
        moment = None
    counted = [o for o in _matching(scene, attributes) if moment is None or scene.present[o.object_id, moment]]
    if "shape" in attributes:
        noun = SHAPE_PLURALS[attributes["shape"]]
    else:
        noun = " ".join([*attributes.values(), "objects"])
    if moment is None:
        text = f"How many {noun} appear in the video?"
    else:
        text = f"How many {noun} are there at the {'start' if moment == 0 else 'end'}?"
    answer = NUMBER_WORDS[len(counted)]
    return Question(
        text=text,
        candidates=_candidates(rng, answer, [], NUMBER_WORDS[1:]),
        answer=answer,
        type="counting",
        object_ids=tuple(o.object_id for o in counted),
        frame_index=moment,
    )


def _draw_moment(scene: Scene, rng: np.random.Generator) -> int | None:
    """The moment v2 counted at: the first or last frame (if nothing present then is mostly
    hidden), or None (the whole clip). Drawn for every count, asked only with
    `moment_counts`: the questions after a count share its random stream, so without these
    draws every later question would be redrawn (v3 did); with them, v4's scenes and every
    question but the counts are v2's, and a model's score moves only with what v4 changed."""
    last_index = scene.config.frame_count - 1
    moments = [frame for frame in (0, last_index)
               if (scene.visible_fraction[scene.present[:, frame], frame] >= _SEEN_FRACTION).all()]
    if scene.focus_object_id is not None:
        moments = [m for m in moments if scene.present[scene.focus_object_id, m]]
    return _choose(rng, moments) if moments and rng.random() < 0.5 else None


def _ask_motion(scene: Scene, rng: np.random.Generator) -> Question | None:
    """"Which direction does the blue square move?" -> left / right / up / down / still."""
    options = [(obj, name) for obj in _targets(scene) if (name := _shortest_unique_name(scene, obj))]
    if not options:
        return None
    obj, name = options[int(rng.integers(len(options)))]
    return _ask_about(scene, rng, obj, tuple(name), "direction", "motion")


_TEMPORAL_EVENTS = {  # question wording -> (the frame that defines the event, whether the earliest wins)
    "appears first": ("first_frame", True),
    "appears last": ("first_frame", False),
    "disappears first": ("last_frame", True),
}


def _ask_temporal_order(scene: Scene, rng: np.random.Generator) -> Question | None:
    """"Which appears first: the circle, the square or the cross?" -> "square".

    Each option is named by one word (its shape, or its colour) that is unique in the scene,
    and the winner's event is at least 2 frames before (or after) every other option's."""
    options = []
    for wording, (event_frame, earliest_wins) in _TEMPORAL_EVENTS.items():
        for naming in ("shape", "colour"):
            named = [o for o in scene.objects if _is_unique(scene, _name_of(o, (naming,)))]
            for group_size in (2, 3):
                for group in itertools.combinations(named, group_size):
                    if scene.focus_object_id is not None and scene.focus_object_id not in [o.object_id for o in group]:
                        continue
                    order = sorted(group, key=lambda o: getattr(o, event_frame), reverse=not earliest_wins)
                    if abs(getattr(order[0], event_frame) - getattr(order[1], event_frame)) >= 2:
                        options.append((wording, event_frame, naming, order))
    if not options:
        return None
    # Half the time, when there is one, ask about a brief object: its answer lives in one moment.
    brief = [option for option in options if _is_brief(option[3][0])]
    if brief and rng.random() < _BRIEF_TEMPORAL_SHARE:
        options = brief
    wording, event_frame, naming, order = options[int(rng.integers(len(options)))]
    listed = _shuffled(rng, order)
    phrases = [f"the {_name_text(_name_of(o, (naming,)))}" for o in listed]
    listing = " or ".join([", ".join(phrases[:-1]), phrases[-1]])
    return Question(
        text=f"Which {wording}: {listing}?",
        candidates=tuple(getattr(o, naming) for o in listed),
        answer=getattr(order[0], naming),
        type="temporal_order",
        object_ids=tuple(o.object_id for o in order),
        frame_index=getattr(order[0], event_frame),
    )


def temporal_event(question: Question) -> tuple[str, bool]:
    """(the SceneObject field that times the event, whether the earliest wins) of a
    temporal-order question, from its wording."""
    for wording, event in _TEMPORAL_EVENTS.items():
        if question.type == "temporal_order" and f"Which {wording}:" in question.text:
            return event
    raise ValueError(f"not a temporal-order question: {question.text!r}")


def _is_brief(obj: SceneObject) -> bool:
    return obj.last_frame - obj.first_frame + 1 <= BRIEF_LIFE_FRAMES[1]


def quadrant_of(scene: Scene, object_id: int, frame_index: int) -> str:
    """"top-left" / "top-right" / "bottom-left" / "bottom-right" of the object's centre."""
    x_px, y_px = scene.centres_px[object_id, frame_index]
    half_px = scene.config.frame_size_px / 2
    return f"{'top' if y_px < half_px else 'bottom'}-{'left' if x_px < half_px else 'right'}"


def _ask_position(scene: Scene, rng: np.random.Generator) -> Question | None:
    """"Where is the red circle when it appears?" -> "bottom-left".

    Only moments where the object is seen and its centre is clearly off both midlines.
    Objects whose quadrant changes over the clip are preferred, so the answer depends on the
    moment named."""
    last_index = scene.config.frame_count - 1
    margin_px = 0.06 * scene.config.frame_size_px
    half_px = scene.config.frame_size_px / 2
    options, moment_dependent = [], []
    for obj in _targets(scene):
        name = _shortest_unique_name(scene, obj)
        if name is None:
            continue
        moments = {
            "at the start": 0 if obj.first_frame == 0 else None,
            "at the end": last_index if obj.last_frame == last_index else None,
            "when it appears": obj.first_frame if obj.first_frame > 0 else None,
            "when it disappears": obj.last_frame if obj.last_frame < last_index else None,
        }
        quadrants_seen = {quadrant_of(scene, obj.object_id, int(t)) for t in np.flatnonzero(scene.seen(obj.object_id))}
        for phrase, frame in moments.items():
            if frame is None or not scene.seen(obj.object_id)[frame]:
                continue
            x_px, y_px = scene.centres_px[obj.object_id, frame]
            if min(abs(x_px - half_px), abs(y_px - half_px)) < margin_px:
                continue
            options.append((obj, name, phrase, frame))
            if len(quadrants_seen) > 1:
                moment_dependent.append(options[-1])
    if not options:
        return None
    pool = moment_dependent if moment_dependent and rng.random() < 0.75 else options
    obj, name, phrase, frame = pool[int(rng.integers(len(pool)))]
    return Question(
        text=f"Where is the {_name_text(name)} {phrase}?",
        candidates=tuple(_shuffled(rng, QUADRANTS)),
        answer=quadrant_of(scene, obj.object_id, frame),
        type="position",
        object_ids=(obj.object_id,),
        frame_index=frame,
    )


def _ask_fine_detail(scene: Scene, rng: np.random.Generator) -> Question | None:
    """"What colour is the dot on the big square?"; the object's own colour is a candidate."""
    options = [
        (obj, name)
        for obj in _targets(scene)
        if obj.dot_colour is not None and (name := _shortest_unique_name(scene, obj))
    ]
    if not options:
        return None
    obj, name = options[int(rng.integers(len(options)))]
    lures = [obj.colour] + [o.dot_colour for o in scene.objects if o.dot_colour] + [o.colour for o in scene.objects]
    return Question(
        text=f"What colour is the dot on the {_name_text(name)}?",
        candidates=_candidates(rng, obj.dot_colour, lures, COLOURS, keep_first_lure=True),
        answer=obj.dot_colour,
        type="fine_detail",
        object_ids=(obj.object_id,),
    )


def _ask_instruction(scene: Scene, rng: np.random.Generator) -> Question | None:
    """"What colour is the big circle?" when there are several circles whose colours differ.

    The head word (shape or colour) names a group of at least two objects, the second property
    singles out one of them, and the asked property differs within the group, so the answer
    depends on reading the whole name."""
    options = []
    for obj in _targets(scene):
        for naming in _INSTRUCTION_NAMINGS:
            if "direction" in naming and obj.direction == "still":
                continue
            if not _is_unique(scene, _name_of(obj, naming)):
                continue
            head = "shape" if "shape" in naming else "colour"
            group = _matching(scene, _name_of(obj, (head,)))
            if len(group) < 2:
                continue
            for asked in _ASK_TEMPLATES:
                if asked not in naming and any(getattr(o, asked) != getattr(obj, asked) for o in group):
                    options.append((obj, naming, asked))
    if not options:
        return None
    obj, naming, asked = options[int(rng.integers(len(options)))]
    return _ask_about(scene, rng, obj, naming, asked, "instruction")


def _candidates(
    rng: np.random.Generator,
    answer: str,
    lures: Sequence[str],
    vocabulary: Sequence[str],
    *,
    count: int = 4,
    keep_first_lure: bool = False,
) -> tuple[str, ...]:
    """`count` distinct shuffled options: the answer, then lures from the scene, then the vocabulary."""
    options = [answer]
    unique_lures = list(dict.fromkeys(word for word in lures if word != answer))
    if keep_first_lure and unique_lures:
        options.append(unique_lures.pop(0))
    for word in _shuffled(rng, unique_lures) + _shuffled(rng, list(vocabulary)):
        if len(options) == count:
            break
        if word not in options:
            options.append(word)
    return tuple(_shuffled(rng, options))


def _choose(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


def _shuffled(rng: np.random.Generator, items: Sequence) -> list:
    return [items[i] for i in rng.permutation(len(items))]


# ---------------------------------------------------------------- splits


def clip_seed(split: str, index: int) -> int:
    """The seed of clip `index` of `split`; splits own disjoint ranges of 10**9 seeds."""
    if split not in SPLITS:
        raise ValueError(f"unknown ShapesWorld split {split!r}; choose from {SPLITS}")
    if not 0 <= index < _SEEDS_PER_SPLIT:
        raise ValueError(f"clip index must be in [0, {_SEEDS_PER_SPLIT}), got {index}")
    return SPLITS.index(split) * _SEEDS_PER_SPLIT + index


def scene_and_questions(
    split: str, index: int, config: ShapesWorldConfig = DEFAULT_CONFIG, *, moment_counts: bool = False
) -> tuple[Scene, list[Question]]:
    """Clip `index` of `split`: its scene and all its questions, a pure function of the two
    (and of `moment_counts`, see `make_questions`: for training).

    The "samples" split (the clips bundled in eval/samples/) only keeps scenes with exactly one
    circle and one square, and puts first the two questions `make run` asks of them."""
    rng = np.random.default_rng(clip_seed(split, index))
    scene = make_scene(rng, config, compositional=split == "compositional")
    if split != "samples":
        return scene, make_questions(scene, rng, moment_counts=moment_counts)
    while len(_matching(scene, {"shape": "circle"})) != 1 or len(_matching(scene, {"shape": "square"})) != 1:
        scene = make_scene(rng, config)
    fixed = [
        _ask_about(scene, rng, _matching(scene, {"shape": "circle"})[0], ("shape",), "colour", "attribute"),
        _ask_about(scene, rng, _matching(scene, {"shape": "square"})[0], ("shape",), "direction", "motion"),
    ]
    fixed_texts = {q.text for q in fixed}
    return scene, fixed + [q for q in make_questions(scene, rng) if q.text not in fixed_texts]


def iter_samples(
    split: str, start: int, count: int, config: ShapesWorldConfig = DEFAULT_CONFIG
) -> Iterator[tuple[np.ndarray, list[Question]]]:
    """(frames uint8 [T, H, W, 3], questions) for clips start .. start + count - 1, in memory."""
    for index in range(start, start + count):
        scene, questions = scene_and_questions(split, index, config)
        yield render(scene), questions


# ---------------------------------------------------------------- writing


def write_mp4(frames: np.ndarray, path: str | Path, fps: int) -> None:
    """Encode uint8 [T, H, W, 3] frames as lossless H.264 (libx264, qp 0, yuv444p).

    Lossless because the fine-detail dot is 5x5 px: 4:2:0 chroma or a lossy rate would blur
    its colour. Flat shapes on a flat background keep the files small (~3-10 KB a clip)."""
    import av  # PyAV; imported here so scene generation and training need no codec

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"qp": "0"})
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv444p"
        stream.codec_context.time_base = Fraction(1, fps)
        for frame_index, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts = frame_index
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def write_split(
    split: str,
    count: int,
    out_dir: str | Path,
    *,
    config: ShapesWorldConfig = DEFAULT_CONFIG,
    questions_per_clip: int | None = None,
    start: int = 0,
) -> Path:
    """Write clips `start .. start + count - 1` of `split` as mp4 files plus `manifest.json`.

    The manifest is a list in an MVBench-like layout, one record per question:
    {"id", "video" (path relative to the manifest), "question", "candidates", "answer", "type",
     "split", "index", "seed", "object_ids", "frame_index"}.
    `questions_per_clip` keeps a seeded random subset of each clip's questions (default: all).
    Returns the manifest's path.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for index in range(start, start + count):
        scene, questions = scene_and_questions(split, index, config)
        video_name = f"{split}_{index:06d}.mp4"
        write_mp4(render(scene), out_dir / video_name, config.fps)
        if questions_per_clip is not None and len(questions) > questions_per_clip:
            pick_rng = np.random.default_rng([clip_seed(split, index), 1])
            kept = sorted(pick_rng.choice(len(questions), questions_per_clip, replace=False))
            questions = [questions[k] for k in kept]
        for question_index, question in enumerate(questions):
            records.append(
                {
                    "id": f"{split}_{index:06d}_{question_index}",
                    "video": video_name,
                    "question": question.text,
                    "candidates": list(question.candidates),
                    "answer": question.answer,
                    "type": question.type,
                    "split": split,
                    "index": index,
                    "seed": clip_seed(split, index),
                    "object_ids": list(question.object_ids),
                    "frame_index": question.frame_index,
                }
            )
    manifest_path = out_dir / "manifest.json"
    manifest_path.write_text(json.dumps(records, indent=1) + "\n")
    return manifest_path


def cached_split(split: str, count: int, root: str | Path) -> Path:
    """The manifest of clips 0 .. count - 1 of `split` under `root`, written on first use. The
    folder is named after the generator version, so a changed generator never serves old clips."""
    manifest_path = Path(root) / f"{split}-{count}-v{GENERATOR_VERSION}" / "manifest.json"
    if not manifest_path.exists():
        write_split(split, count, manifest_path.parent)
    return manifest_path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m eval.shapesworld", description="Write a ShapesWorld split.")
    parser.add_argument("--split", choices=SPLITS, required=True)
    parser.add_argument("--count", type=int, required=True, help="number of clips")
    parser.add_argument("--out", type=Path, required=True, help="folder for the mp4 files and manifest.json")
    parser.add_argument("--start", type=int, default=0, help="index of the first clip")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--questions-per-clip", type=int, default=None, help="default: all")
    args = parser.parse_args(argv)
    manifest_path = write_split(
        args.split,
        args.count,
        args.out,
        config=ShapesWorldConfig.from_name(args.preset),
        questions_per_clip=args.questions_per_clip,
        start=args.start,
    )
    print(f"wrote {args.count} clips of {args.split} and {manifest_path}")


if __name__ == "__main__":
    main()
