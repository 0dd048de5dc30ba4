"""The mini world: seeded scenes of coloured shapes, their rendering (PIL + numpy) and the text about them.

A *scene* is 1-3 objects of one kind, colour and size on a plain background; a single object also has a named
position. A *clip* is one object that moves (direction, speed) or changes colour over a few frames. All randomness
comes from a `numpy.random.Generator` handed in by the caller, so a seed fixes everything.

Two kinds of held-out data make the evaluation honest:
- held-out images: evaluation scenes come from their own random streams (fresh jitter, colours, placements);
- held-out combinations: a few (kind, colour) pairs, one per kind and one per colour, never occur in training
  scenes or text; evaluation scenes use them with probability `novel_prob`.
Nonsense words for the concept-binding episodes ("dax", "blicket", ...) are built from syllables; the words of the
evaluation episodes are drawn first, and training words are drawn from everything else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

KINDS = ("circle", "square", "triangle", "star", "cross", "heart", "diamond", "ring")
PLURALS = {"cross": "crosses"}  # the rest take an "s"
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35), "orange": (245, 135, 20), "yellow": (240, 220, 40), "green": (40, 170, 60),
    "cyan": (40, 205, 215), "blue": (45, 75, 225), "purple": (140, 55, 195), "pink": (250, 135, 195),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"black": (22, 22, 22), "grey": (118, 118, 118),
                                                "white": (236, 236, 236)}
SIZES = ("small", "big")
# Radius as a fraction of the image side: a big object just fits one cell of the 3x3 grid.
RADIUS = {"small": 0.105, "big": 0.155}
POSITIONS: dict[str, tuple[float, float]] = {"left": (1 / 6, 0.5), "right": (5 / 6, 0.5), "top": (0.5, 1 / 6),
                                             "bottom": (0.5, 5 / 6), "middle": (0.5, 0.5)}
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                    "middle": "in the middle"}
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
DIRECTIONS: dict[str, tuple[float, float]] = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0),
                                              "down": (0.0, 1.0)}
DIRECTION_PHRASES = {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}
# Distance travelled over the whole clip, as a fraction of the image side.
SPEEDS = {"slow": 0.3, "fast": 0.6}
SPEED_ADVERBS = {"slow": "slowly", "fast": "quickly"}

_SUPERSAMPLE = 4  # render at 4x and box-filter down: anti-aliased edges

Split = Literal["train", "eval"]


def plural(kind: str) -> str:
    return PLURALS.get(kind, kind + "s")


def world_vocabulary() -> set[str]:
    """Every attribute word the world's templates use (nonsense words must avoid them)."""
    words = set(KINDS) | {plural(k) for k in KINDS} | set(COLOURS) | set(BACKGROUNDS) | set(SIZES)
    words |= set(POSITIONS) | set(DIRECTIONS) | set(SPEEDS) | set(COUNT_WORDS.values())
    return words


# ------------------------------------------------------------------------------------------------------ scenes
@dataclass(frozen=True)
class Scene:
    """A still image: `count` objects of one kind/colour/size. `centers` are (x, y) fractions of the side."""

    kind: str
    colour: str
    size: str
    count: int
    position: Optional[str]  # named position of a single object, None when count > 1
    background: str
    centers: tuple[tuple[float, float], ...]
    radius: float
    rotation: float  # degrees
    rgb: tuple[int, int, int]  # the jittered object colour actually drawn
    bg_rgb: tuple[int, int, int]
    novel: bool = False  # a held-out (kind, colour) combination


@dataclass(frozen=True)
class Clip:
    """A short video of one object: `motion` "move" (direction, speed) or "turn" (colour -> colour_to)."""

    frames: tuple[Scene, ...]
    motion: str
    direction: Optional[str] = None
    speed: Optional[str] = None
    colour_to: Optional[str] = None

    @property
    def first(self) -> Scene:
        return self.frames[0]


class World:
    """Samples scenes, clips and nonsense words; renders and describes them. Deterministic given `seed`.

    Args:
        seed: fixes the held-out combinations and the evaluation words.
        image_size: side of the rendered stills in pixels.
        novel_prob: probability that an evaluation scene uses a held-out (kind, colour) combination.
        num_eval_words: size of the pool of nonsense words reserved for evaluation episodes.
    """

    def __init__(self, seed: int = 0, image_size: int = 32, novel_prob: float = 0.25, num_eval_words: int = 1000):
        if image_size < 16 or image_size % 2:
            raise ValueError(f"image_size must be even and >= 16, got {image_size}")
        self.seed, self.image_size, self.novel_prob = seed, image_size, novel_prob
        rng = np.random.default_rng([seed, 7])
        # One held-out colour per kind, all different (a random permutation): every kind and every colour is still
        # seen in training, only these pairings are not.
        colours = list(COLOURS)
        perm = rng.permutation(len(colours))
        self.heldout_combos: frozenset[tuple[str, str]] = frozenset(
            (kind, colours[perm[i]]) for i, kind in enumerate(KINDS))
        self.words = NonsenseWords()
        self.eval_words: tuple[str, ...] = self.words.sample_unique(np.random.default_rng([seed, 8]), num_eval_words)
        self._eval_word_set = frozenset(self.eval_words)

    # -------------------------------------------------------------------------------------------- sampling
    def allowed(self, kind: str, colour: str, split: Split) -> bool:
        return split == "eval" or (kind, colour) not in self.heldout_combos

    def sample_kind_colour(self, rng: np.random.Generator, split: Split, kind: Optional[str] = None,
                           novel: Optional[bool] = None) -> tuple[str, str, bool]:
        """A (kind, colour) pair for `split`: training never gets a held-out pair; evaluation gets one with
        probability `novel_prob` (or exactly when `novel` says so)."""
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        kind = kind if kind is not None else KINDS[rng.integers(len(KINDS))]
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}")
        if novel is None:
            novel = split == "eval" and rng.random() < self.novel_prob
        if novel and split == "train":
            raise ValueError("training scenes never use held-out combinations")
        held = [c for c in COLOURS if (kind, c) in self.heldout_combos]
        choices = held if novel else [c for c in COLOURS if (kind, c) not in self.heldout_combos]
        return kind, choices[rng.integers(len(choices))], bool(novel)

    def sample_scene(self, rng: np.random.Generator, split: Split, *, kind: Optional[str] = None,
                     colour: Optional[str] = None, count: Optional[int] = None, size: Optional[str] = None,
                     position: Optional[str] = None, novel: Optional[bool] = None) -> Scene:
        if colour is None:
            kind, colour, novel = self.sample_kind_colour(rng, split, kind, novel)
        else:
            kind = kind if kind is not None else KINDS[rng.integers(len(KINDS))]
            if not self.allowed(kind, colour, split):
                raise ValueError(f"({kind}, {colour}) is a held-out combination")
            novel = (kind, colour) in self.heldout_combos
        count = count if count is not None else int(rng.choice([1, 1, 2, 3]))
        size = size if size is not None else SIZES[rng.integers(2)]
        radius = RADIUS[size] * rng.uniform(0.92, 1.08)
        if count == 1:
            position = position if position is not None else list(POSITIONS)[rng.integers(len(POSITIONS))]
            cx, cy = POSITIONS[position]
            centers = ((cx + rng.uniform(-0.03, 0.03), cy + rng.uniform(-0.03, 0.03)),)
        else:
            cells = rng.choice(9, size=count, replace=False)
            jitter = 0.02 if size == "big" else 0.05
            centers = tuple((1 / 6 + (c % 3) / 3 + rng.uniform(-jitter, jitter),
                             1 / 6 + (c // 3) / 3 + rng.uniform(-jitter, jitter)) for c in cells)
            position = None
        background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
        return Scene(kind=kind, colour=colour, size=size, count=count, position=position, background=background,
                     centers=centers, radius=float(radius), rotation=float(rng.uniform(-12, 12)),
                     rgb=_jitter(COLOURS[colour], rng, 12), bg_rgb=_jitter(BACKGROUNDS[background], rng, 10),
                     novel=novel)

    def sample_clip(self, rng: np.random.Generator, split: Split, num_frames: int, *,
                    motion: Optional[str] = None) -> Clip:
        """A clip of `num_frames` frames: a moving object (2/3 of clips) or one that changes colour."""
        if num_frames < 2:
            raise ValueError(f"a clip needs at least 2 frames, got {num_frames}")
        motion = motion if motion is not None else ("move" if rng.random() < 2 / 3 else "turn")
        base = self.sample_scene(rng, split, count=1)
        if motion == "move":
            direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
            speed = list(SPEEDS)[rng.integers(len(SPEEDS))]
            dx, dy = DIRECTIONS[direction]
            travel, margin = SPEEDS[speed], base.radius + 0.02
            # Start so that the whole path stays inside the frame; the other coordinate is free.
            along = rng.uniform(margin, 1 - margin - travel)
            across = rng.uniform(0.3, 0.7)
            start = along if (dx > 0 or dy > 0) else 1 - along
            frames = []
            for f in range(num_frames):
                p = start + (dx + dy) * travel * f / (num_frames - 1)
                center = (p, across) if dx else (across, p)
                frames.append(replace(base, centers=(center,), position=None))
            return Clip(frames=tuple(frames), motion="move", direction=direction, speed=speed)
        if motion != "turn":
            raise ValueError(f"motion must be 'move' or 'turn', got {motion!r}")
        others = [c for c in COLOURS if c != base.colour and self.allowed(base.kind, c, split)]
        colour_to = others[rng.integers(len(others))]
        novel = base.novel or (base.kind, colour_to) in self.heldout_combos
        rgb_to = _jitter(COLOURS[colour_to], rng, 12)
        switch = num_frames // 2
        frames = tuple(replace(base, colour=base.colour if f < switch else colour_to,
                               rgb=base.rgb if f < switch else rgb_to, novel=novel)
                       for f in range(num_frames))
        return Clip(frames=frames, motion="turn", colour_to=colour_to)

    def train_word(self, rng: np.random.Generator) -> str:
        """A fresh nonsense word that is never used by an evaluation episode."""
        while True:
            word = self.words.sample(rng)
            if word not in self._eval_word_set:
                return word

    def train_words(self, rng: np.random.Generator, n: int) -> list[str]:
        words: list[str] = []
        while len(words) < n:
            word = self.train_word(rng)
            if word not in words:
                words.append(word)
        return words

    # ------------------------------------------------------------------------------------------- rendering
    def render(self, scene: Scene, size: Optional[int] = None) -> np.ndarray:
        """The scene as an (H, W, 3) uint8 array, H = W = `size` (default: the world's image size)."""
        return render_scene(scene, size or self.image_size)

    def render_clip(self, clip: Clip, size: Optional[int] = None) -> np.ndarray:
        return np.stack([self.render(f, size) for f in clip.frames])  # (F, H, W, 3)

    # ------------------------------------------------------------------------------------------------ text
    def captions(self, scene: Scene) -> list[str]:
        """All the ways the world describes a still; the first is the canonical one."""
        c, s, bg = scene.colour, scene.size, scene.background
        if scene.count == 1:
            k, pos = scene.kind, POSITION_PHRASES[scene.position or "middle"]
            return [f"a {s} {c} {k} {pos}.", f"a {c} {k} {pos}.", f"there is a {s} {c} {k} {pos}.",
                    f"a {s} {c} {k} {pos} on a {bg} background.", f"{pos}, a {s} {c} {k}."]
        n, ks = COUNT_WORDS[scene.count], plural(scene.kind)
        return [f"{n} {s} {c} {ks}.", f"there are {n} {c} {ks}.", f"{n} {s} {c} {ks} on a {bg} background.",
                f"{n} {c} {ks}, all {s}.", f"there are {n} {s} {ks}, all {c}."]

    def caption(self, scene: Scene, rng: np.random.Generator) -> str:
        """One description, the canonical one half of the time."""
        options = self.captions(scene)
        return options[0] if rng.random() < 0.5 else options[rng.integers(1, len(options))]

    def questions(self, scene: Scene) -> list[tuple[str, str, str]]:
        """(question_type, question, answer) about a still, in VQA's short-answer style (counts as digits)."""
        one = scene.count == 1
        qa = [("colour", "What colour is the object?" if one else "What colour are the objects?", scene.colour),
              ("shape", "What shape is it?" if one else "What shape are they?", scene.kind),
              ("count", "How many objects are there?", str(scene.count)),
              ("size", "Is the object big or small?" if one else "Are the objects big or small?", scene.size),
              ("background", "What colour is the background?", scene.background)]
        if one:
            qa.append(("position", "Where is the object?", scene.position or "middle"))
        return qa

    def clip_captions(self, clip: Clip) -> list[str]:
        f = clip.first
        s, c, k = f.size, f.colour, f.kind
        if clip.motion == "move":
            d, a = DIRECTION_PHRASES[clip.direction or "left"], SPEED_ADVERBS[clip.speed or "slow"]
            return [f"a {c} {k} moving {d}.", f"a {s} {c} {k} moving {d} {a}.", f"a {c} {k} moves {a} {d}.",
                    f"a {s} {c} {k} moving {d}."]
        t = clip.colour_to
        return [f"a {c} {k} turning {t}.", f"a {s} {k} changing colour from {c} to {t}.",
                f"a {s} {c} {k} turns {t}.", f"a {k} that turns from {c} to {t}."]

    def clip_caption(self, clip: Clip, rng: np.random.Generator) -> str:
        options = self.clip_captions(clip)
        return options[0] if rng.random() < 0.5 else options[rng.integers(1, len(options))]

    def clip_questions(self, clip: Clip) -> list[tuple[str, str, str]]:
        f = clip.first
        if clip.motion == "move":
            return [("direction", "Which direction does the object move?", clip.direction or ""),
                    ("speed", "Is the object moving fast or slow?", clip.speed or ""),
                    ("shape", "What shape is moving?", f.kind)]
        return [("colour_to", "What colour does the object turn?", clip.colour_to or ""),
                ("colour_from", "What colour is the object at first?", f.colour),
                ("shape", "What shape changes colour?", f.kind)]


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator, amount: int) -> tuple[int, int, int]:
    return tuple(int(np.clip(v + rng.integers(-amount, amount + 1), 0, 255)) for v in rgb)  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------ rendering
def shape_polygon(kind: str, cx: float, cy: float, r: float, rotation: float) -> list[tuple[float, float]]:
    """Outline of a polygonal kind around (cx, cy) with circumradius r (pixels), rotated by `rotation` degrees."""
    if kind == "square":
        pts = [(math.cos(a), math.sin(a)) for a in np.pi / 4 + np.arange(4) * np.pi / 2]
        pts = [(x * 0.92, y * 0.92) for x, y in pts]
    elif kind == "triangle":
        pts = [(math.cos(a), math.sin(a) + 0.15) for a in -np.pi / 2 + np.arange(3) * 2 * np.pi / 3]
    elif kind == "diamond":
        pts = [(0.0, -1.0), (0.62, 0.0), (0.0, 1.0), (-0.62, 0.0)]
    elif kind == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        pts = [(math.cos(a) * (1.0 if i % 2 == 0 else 0.42), math.sin(a) * (1.0 if i % 2 == 0 else 0.42))
               for i, a in enumerate(angles)]
    elif kind == "cross":
        w = 0.3
        pts = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w),
               (-w, -w)]
    elif kind == "heart":
        t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        pts = list(zip(x / 16.5, (y + 2.5) / 16.5))
    else:
        raise ValueError(f"{kind!r} is not a polygonal kind")
    c, s = math.cos(math.radians(rotation)), math.sin(math.radians(rotation))
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def render_scene(scene: Scene, size: int) -> np.ndarray:
    """Draw the scene at `_SUPERSAMPLE` x `size` and box-filter down. Returns (size, size, 3) uint8."""
    big = size * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), scene.bg_rgb)
    draw = ImageDraw.Draw(image)
    r = scene.radius * big
    for fx, fy in scene.centers:
        cx, cy = fx * big, fy * big
        if scene.kind in ("circle", "ring"):
            box = (cx - r * 0.95, cy - r * 0.95, cx + r * 0.95, cy + r * 0.95)
            if scene.kind == "circle":
                draw.ellipse(box, fill=scene.rgb)
            else:
                draw.ellipse(box, outline=scene.rgb, width=max(1, int(round(r * 0.38))))
        else:
            draw.polygon(shape_polygon(scene.kind, cx, cy, r, scene.rotation), fill=scene.rgb)
    return np.asarray(image.reduce(_SUPERSAMPLE))


# ---------------------------------------------------------------------------------------------- nonsense words
_ONSETS = ("b", "bl", "br", "d", "dr", "f", "fl", "g", "gl", "gr", "k", "kl", "l", "m", "n", "p", "pl", "pr", "r", "s",
           "sk", "sl", "sn", "st", "t", "tr", "v", "w", "z", "zh", "j", "ch")
_VOWELS = ("a", "e", "i", "o", "u", "oo", "ee", "ai")
_CODAS = ("", "", "", "x", "k", "p", "t", "n", "m", "g", "sh", "b", "ck", "zz")
# Common short English words the syllable generator could stumble on.
_ENGLISH = frozenset("""a an and are as at be big but by can do for from get go had has he her him his how if in is
it its me my no not of on one or out see she so that the them then they this to too two up us was we what when where
who why will with yes you top tip bat bin bun but cat cot cup dip dog dot fan fig fin fit fun gap gun hat hit hot
jam jet kit lap leg let lip log man map mat men mix mop mud nap net nut pan pat peg pen pet pig pin pit pot pub rag
ram rat red rib rim rip rob rod rot rub rug run sad sat set sit six sob sun tan tap ten tin tub van vet wax web wet
win wig zip zoo bee see tee free tree three glee green grin grim drip drop skip slip snip stop trip plan plot slot
spot blue black brown gem bed bug hug jug mug nod pod vat wit zap clip flip flop glob grab grub plum slim slam swim
trim yellow pink ring star heart cross box""".split())


class NonsenseWords:
    """Pronounceable nonsense words from onset-vowel(-coda) syllables, one or two syllables long."""

    def __init__(self, banned: Sequence[str] = ()):
        self.banned = frozenset(banned) | _ENGLISH | world_vocabulary()

    def sample(self, rng: np.random.Generator) -> str:
        while True:
            syllables = 1 if rng.random() < 0.4 else 2
            parts = []
            for i in range(syllables):
                parts.append(_ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))])
                if i == syllables - 1 or rng.random() < 0.3:
                    parts.append(_CODAS[rng.integers(len(_CODAS))])
            word = "".join(parts)
            if len(word) >= 3 and word not in self.banned:
                return word

    def sample_unique(self, rng: np.random.Generator, n: int) -> tuple[str, ...]:
        words: dict[str, None] = {}
        while len(words) < n:
            words[self.sample(rng)] = None
        return tuple(words)
