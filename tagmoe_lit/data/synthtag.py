"""SynthTAG: a procedural corpus of image generation + editing tasks whose targets are exact.

Why it exists: the kit needs a task-diverse corpus that runs offline and on CPU (tests, smoke
runs, routing/alignment studies) in which every target is *exactly* determined by the
instruction and the source, so a model's error can be measured against ground truth rather than
judged. The nine tasks cover all four scopes of the `synthtag` tag schema
(`tags/schemas/synthtag.yaml`); `TASK_TAGS` gives each task's tags.

What a scene is: 1-2 small objects (a shape in a palette colour, distinct colours) at the centres
of a 3x3 grid of named positions, on a plain / striped / checkered background of palette colours
that the objects never share. Conventions the instructions rely on: the first colour named for a
two-colour background is the one at the top-left pixel; stripes and checks have period
`image_size // 8`; objects have side `image_size // 5`.

Why the outputs are reproducible byte for byte: everything is drawn with integer tensor arithmetic
(coordinate comparisons, integer masks, no floating maths), and all randomness comes from a
`random.Random` seeded with a string naming (seed, index, task), whose seeding (SHA-512) and the
`choice` / `sample` / `randrange` draws used here are identical on every platform. A sample thus
depends only on (seed, index, task), not on call order or worker; the same (seed, index) at
another `image_size` is the same scene at another resolution.
"""

from __future__ import annotations

import operator
import random
from dataclasses import dataclass
from functools import partial
from typing import Callable, NamedTuple, Sequence

import torch

from tagmoe_lit.data.interference import DIAL_OPS, DIAL_TASK_TAGS, brighter, darker, gray

TASK_TAGS: dict[str, dict[str, list[str]]] = {
    "generate": {"scope": ["image generation"]},
    "recolor": {
        "scope": ["local editing"],
        "type": ["attribute editing"],
        "preservation": ["background preservation"],
    },
    "add": {"scope": ["local editing"], "type": ["object addition"], "preservation": ["background preservation"]},
    "remove": {"scope": ["local editing"], "type": ["object removal"], "preservation": ["background preservation"]},
    "move": {"scope": ["local editing"], "type": ["object moving"], "preservation": ["background preservation"]},
    "background": {
        "scope": ["global editing"],
        "type": ["background editing"],
        "preservation": ["structure preservation"],
    },
    "stylize": {"scope": ["global editing"], "type": ["style transfer"], "preservation": ["structure preservation"]},
    "relight": {
        "scope": ["global editing"],
        "type": ["illumination editing"],
        "preservation": ["structure preservation"],
    },
    "customize": {"scope": ["content customization"], "preservation": ["identity preservation"]},
}
TASKS: tuple[str, ...] = tuple(TASK_TAGS)  # the default draw: the nine tasks above

TASK_TAGS.update(DIAL_TASK_TAGS)  # opt-in: the interference dial's tasks (`interference.py`)

# Saturated colours only: no white, gray or black, so inverting, grayscaling, darkening and
# brightening change every pixel of every scene (global edits must change > 50 % of pixels).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (30, 180, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 20),
    "orange": (245, 130, 20),
    "purple": (140, 40, 180),
    "cyan": (20, 200, 220),
    "pink": (245, 110, 180),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right",
)
BACKGROUNDS: tuple[str, ...] = ("plain", "horizontal stripes", "vertical stripes", "checkers")

_COLOURS = tuple(PALETTE)
# [3, 1, 1] so that `torch.where(mask, colour, image)` paints: elementwise ops stay single-threaded
# on small images, whereas indexed gathers / puts parallelize and crawl when the CPU is contended.
_RGB = {name: torch.tensor(rgb, dtype=torch.uint8).view(3, 1, 1) for name, rgb in PALETTE.items()}
# The customize reference's backdrop: outside the palette, so it never matches the subject.
_REFERENCE_GRAY = torch.tensor((200, 200, 200), dtype=torch.uint8).view(3, 1, 1)
_CENTER = POSITIONS.index("center")
_AT = {
    "top left": "at the top left", "top": "at the top", "top right": "at the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "at the bottom left", "bottom": "at the bottom", "bottom right": "at the bottom right",
}
_ADJECTIVE = {
    "horizontal stripes": "horizontally striped", "vertical stripes": "vertically striped", "checkers": "checkered",
}
# Customize subjects are two-colour so that identity means more than shape + one colour:
# "outlined" = outline colour ring around a fill colour; "split" = top half / bottom half.
_SUBJECT_STYLES = ("outlined", "split")


@dataclass(frozen=True, eq=False)  # eq=False: field-wise == on tensors would be ambiguous
class SynthSample:
    """One task instance; `mask` is True wherever `target` may differ from `source`.

    Masks are tight: for local edits and background replacement they are exactly the pixels that
    change; for stylize / relight / customize / generate they are all True.
    """

    instruction: str
    source: torch.Tensor | None  # uint8 [3, H, W]; None for text-to-image
    target: torch.Tensor  # uint8 [3, H, W]
    mask: torch.Tensor  # bool [H, W]
    task: str
    tags: dict[str, list[str]]  # {level: [tag names]} == TASK_TAGS[task]


# What each task maker returns: (instruction, source, target, mask).
_Made = tuple[str, torch.Tensor | None, torch.Tensor, torch.Tensor]


class _Obj(NamedTuple):
    shape: str
    colour: str
    cell: int  # index into POSITIONS


class _Bg(NamedTuple):
    kind: str  # one of BACKGROUNDS
    colours: tuple[str, ...]  # one for plain, else two (first at the top-left pixel)


def _noun(obj: _Obj) -> str:
    return f"{obj.colour} {obj.shape}"


def _a(phrase: str) -> str:
    """Phrase with its indefinite article ("an orange square")."""
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def _describe(bg: _Bg) -> str:
    """Noun phrase naming a background completely ("a red and blue checkered background")."""
    if bg.kind == "plain":
        return f"a plain {bg.colours[0]} background"
    return _a(f"{bg.colours[0]} and {bg.colours[1]} {_ADJECTIVE[bg.kind]} background")


class SynthTAG:
    """Deterministic generator of SynthTAG samples: `sample(index)` for index 0, 1, 2, ...

    `tasks` restricts the default draw to a subset of `TASKS` (or names the dial's tasks), cycled in the given order
    (index % len(tasks)), so every task is equally frequent; listing a task twice doubles its share.
    """

    def __init__(self, image_size: int = 32, seed: int = 0, tasks: Sequence[str] | None = None) -> None:
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 16 or image_size % 8:
            raise ValueError(
                "SynthTAG image_size must be an integer multiple of 8 that is >= 16 (e.g. 32 or 64); "
                f"got {image_size!r}."
            )
        if tasks is None:
            tasks = TASKS
        elif isinstance(tasks, str):
            raise ValueError(
                f"SynthTAG tasks must be a list of task names such as ['{tasks}']; valid tasks: {list(TASK_TAGS)}."
            )
        unknown = [t for t in tasks if t not in TASK_TAGS]
        if unknown or not tasks:
            problem = f"unknown task(s) {unknown}" if unknown else "no tasks given"
            raise ValueError(f"SynthTAG: {problem}; valid tasks: {list(TASK_TAGS)}.")
        self.image_size = image_size
        self.seed = seed
        self.tasks: tuple[str, ...] = tuple(tasks)
        self._makers: dict[str, Callable[[random.Random], _Made]] = {
            "generate": self._generate,
            "recolor": self._recolor,
            "add": self._add,
            "remove": self._remove,
            "move": self._move,
            "background": self._replace_background,
            "stylize": self._stylize,
            "relight": self._relight,
            "customize": self._customize,
            **{name: partial(self._dial, name) for name in DIAL_OPS},
        }
        self._build_geometry()

    def _build_geometry(self) -> None:
        """Precompute every mask a sample can need, so sampling is table look-ups plus a few copies."""
        size = self.image_size
        side = size // 5
        period = size // 8
        yy = torch.arange(size).view(size, 1)
        xx = torch.arange(size).view(1, size)
        # True where a background takes its second colour.
        self._patterns = {
            "plain": torch.zeros(size, size, dtype=torch.bool),
            "horizontal stripes": ((yy // period) % 2 == 1).expand(size, size),
            "vertical stripes": ((xx // period) % 2 == 1).expand(size, size),
            "checkers": (yy // period + xx // period) % 2 == 1,
        }
        # Box starts of the three rows/columns, mirror-symmetric about the image centre.
        edge = (size - 3 * side) // 6
        starts = (edge, (size - side) // 2, size - side - edge)
        self._footprints: dict[tuple[str, int], torch.Tensor] = {}
        self._second_colour: dict[tuple[str, str, int], torch.Tensor] = {}
        thickness = max(1, side // 6)
        for cell in range(len(POSITIONS)):
            y0, x0 = starts[cell // 3], starts[cell % 3]
            i, j = yy - y0, xx - x0
            inside = (i >= 0) & (i < side) & (j >= 0) & (j < side)
            # Doubled offsets from the box centre: integers, symmetric for odd and even sides.
            dy, dx = 2 * i - (side - 1), 2 * j - (side - 1)
            shapes = {
                "circle": dy * dy + dx * dx <= side * side,
                "square": torch.ones(size, size, dtype=torch.bool),
                # Apex at the top centre, half-width growing half a pixel a row to the full base.
                "triangle": dx.abs() <= i + 1,
                "diamond": dy.abs() + dx.abs() <= side,
            }
            for shape in SHAPES:
                footprint = inside & shapes[shape]
                self._footprints[shape, cell] = footprint
                interior = footprint
                for _ in range(thickness):
                    interior = _erode(interior)
                self._second_colour[shape, "outlined", cell] = interior
                self._second_colour[shape, "split", cell] = footprint & (i >= side // 2)
        self._reference = _REFERENCE_GRAY.expand(3, size, size).contiguous()
        self._background_cache: dict[_Bg, torch.Tensor] = {}

    # -- public API ---------------------------------------------------------------------------
    def sample(self, index: int, task: str | None = None) -> SynthSample:
        """Sample `index`; `task` defaults to `self.tasks[index % len(self.tasks)]` (any of TASKS may be forced)."""
        index = operator.index(index)
        if task is None:
            task = self.tasks[index % len(self.tasks)]
        elif task not in TASK_TAGS:
            raise ValueError(f"SynthTAG: unknown task '{task}'; valid tasks: {list(TASK_TAGS)}.")
        rng = random.Random(f"synthtag/{self.seed}/{index}/{task}")
        instruction, source, target, mask = self._makers[task](rng)
        tags = {level: list(names) for level, names in TASK_TAGS[task].items()}
        return SynthSample(instruction, source, target, mask, task, tags)

    def __getitem__(self, index: int) -> SynthSample:
        return self.sample(index)

    # -- drawing ------------------------------------------------------------------------------
    def _background(self, bg: _Bg) -> torch.Tensor:
        """Background image (cached and shared: never modify it in place)."""
        image = self._background_cache.get(bg)
        if image is None:
            image = torch.where(self._patterns[bg.kind], _RGB[bg.colours[-1]], _RGB[bg.colours[0]])
            self._background_cache[bg] = image
        return image

    def _paint(self, image: torch.Tensor, obj: _Obj) -> torch.Tensor:
        return torch.where(self._footprints[obj.shape, obj.cell], _RGB[obj.colour], image)

    def _render(self, bg: _Bg, objects: Sequence[_Obj]) -> torch.Tensor:
        image = self._background(bg)
        for obj in objects:
            image = self._paint(image, obj)
        return image if objects else image.clone()  # never hand out the cached background itself

    def _paint_subject(
        self, image: torch.Tensor, shape: str, style: str, colours: Sequence[str], cell: int
    ) -> torch.Tensor:
        image = torch.where(self._footprints[shape, cell], _RGB[colours[0]], image)
        return torch.where(self._second_colour[shape, style, cell], _RGB[colours[1]], image)

    def _scene(self, rng: random.Random, n_objects: int, n_spare: int = 0) -> tuple[_Bg, list[_Obj], list[str]]:
        """A background and objects in distinct cells and colours, plus `n_spare` further unused colours."""
        kind = rng.choice(BACKGROUNDS)
        n_bg = 1 if kind == "plain" else 2
        colours = rng.sample(_COLOURS, n_objects + n_bg + n_spare)
        cells = rng.sample(range(len(POSITIONS)), n_objects)
        objects = [_Obj(rng.choice(SHAPES), colours[k], cells[k]) for k in range(n_objects)]
        bg = _Bg(kind, tuple(colours[n_objects : n_objects + n_bg]))
        return bg, objects, colours[n_objects + n_bg :]

    def _full_mask(self) -> torch.Tensor:
        return torch.ones(self.image_size, self.image_size, dtype=torch.bool)

    @staticmethod
    def _free_cell(rng: random.Random, objects: Sequence[_Obj]) -> int:
        taken = {o.cell for o in objects}
        return rng.choice([c for c in range(len(POSITIONS)) if c not in taken])

    # -- tasks: each returns (instruction, source, target, mask) --------------------------------
    def _generate(self, rng: random.Random) -> _Made:
        bg, objects, _ = self._scene(rng, rng.choice((1, 2)))
        things = " and ".join(f"{_a(_noun(o))} {_AT[POSITIONS[o.cell]]}" for o in objects)
        return f"{things} on {_describe(bg)}", None, self._render(bg, objects), self._full_mask()

    def _recolor(self, rng: random.Random) -> _Made:
        n = rng.choice((1, 2))
        bg, objects, (new_colour,) = self._scene(rng, n, 1)
        k = rng.randrange(n)
        old = objects[k]
        source = self._render(bg, objects)
        target = self._paint(source, old._replace(colour=new_colour))
        mask = self._footprints[old.shape, old.cell].clone()
        return f"make the {_noun(old)} {new_colour}", source, target, mask

    def _add(self, rng: random.Random) -> _Made:
        bg, objects, (new_colour,) = self._scene(rng, 1, 1)
        new = _Obj(rng.choice(SHAPES), new_colour, self._free_cell(rng, objects))
        source = self._render(bg, objects)
        target = self._paint(source, new)
        mask = self._footprints[new.shape, new.cell].clone()
        return f"add {_a(_noun(new))} {_AT[POSITIONS[new.cell]]}", source, target, mask

    def _remove(self, rng: random.Random) -> _Made:
        bg, objects, _ = self._scene(rng, 2)
        k = rng.randrange(2)
        gone = objects[k]
        source = self._render(bg, objects)
        target = self._render(bg, objects[1 - k : 2 - k])
        mask = self._footprints[gone.shape, gone.cell].clone()
        return f"remove the {_noun(gone)}", source, target, mask

    def _move(self, rng: random.Random) -> _Made:
        n = rng.choice((1, 2))
        bg, objects, _ = self._scene(rng, n)
        k = rng.randrange(n)
        old = objects[k]
        new = old._replace(cell=self._free_cell(rng, objects))
        moved = list(objects)
        moved[k] = new
        mask = self._footprints[old.shape, old.cell] | self._footprints[new.shape, new.cell]
        instruction = f"move the {_noun(old)} to the {POSITIONS[new.cell]}"
        return instruction, self._render(bg, objects), self._render(bg, moved), mask

    def _replace_background(self, rng: random.Random) -> _Made:
        # Two spare colours: the new background shares no colour with the old one or the objects,
        # so every background pixel changes while every object pixel stays.
        bg, objects, spare = self._scene(rng, rng.choice((1, 2)), 2)
        kind = rng.choice(BACKGROUNDS)
        new_bg = _Bg(kind, tuple(spare[:1] if kind == "plain" else spare))
        if kind == "plain":
            wanted = f"plain {spare[0]}"
        else:
            wanted = f"{spare[0]} and {spare[1]} {kind}"
        objects_mask = torch.zeros(self.image_size, self.image_size, dtype=torch.bool)
        for obj in objects:
            objects_mask |= self._footprints[obj.shape, obj.cell]
        source, target = self._render(bg, objects), self._render(new_bg, objects)
        return f"replace the background with {wanted}", source, target, ~objects_mask

    def _stylize(self, rng: random.Random) -> _Made:
        bg, objects, _ = self._scene(rng, rng.choice((1, 2)))
        source = self._render(bg, objects)
        if rng.choice(("invert", "grayscale")) == "invert":
            return "invert the colors", source, 255 - source, self._full_mask()
        return "convert the image to grayscale", source, gray(source), self._full_mask()

    def _relight(self, rng: random.Random) -> _Made:
        bg, objects, _ = self._scene(rng, rng.choice((1, 2)))
        source = self._render(bg, objects)
        if rng.choice(("darker", "brighter")) == "darker":
            return "make the image darker", source, darker(source), self._full_mask()
        return "make the image brighter", source, brighter(source), self._full_mask()

    def _dial(self, name: str, rng: random.Random) -> _Made:
        """One of the interference dial's global edits of a scene drawn as relight and stylize draw theirs."""
        bg, objects, _ = self._scene(rng, rng.choice((1, 2)))
        source = self._render(bg, objects)
        instruction, op = DIAL_OPS[name]
        return instruction, source, op(source), self._full_mask()

    def _customize(self, rng: random.Random) -> _Made:
        shape, style = rng.choice(SHAPES), rng.choice(_SUBJECT_STYLES)
        kind = rng.choice(BACKGROUNDS)
        n_bg = 1 if kind == "plain" else 2
        colours = rng.sample(_COLOURS, 2 + n_bg)
        bg = _Bg(kind, tuple(colours[2:]))
        cell = rng.randrange(len(POSITIONS))
        source = self._paint_subject(self._reference, shape, style, colours[:2], _CENTER)
        target = self._paint_subject(self._background(bg), shape, style, colours[:2], cell)
        instruction = f"place this subject {_AT[POSITIONS[cell]]} on {_describe(bg)}"
        return instruction, source, target, self._full_mask()


def _erode(mask: torch.Tensor) -> torch.Tensor:
    """Pixels of `mask` whose four neighbours are all in `mask` (outside the image counts as out)."""
    out = mask.clone()
    out[1:, :] &= mask[:-1, :]
    out[:-1, :] &= mask[1:, :]
    out[:, 1:] &= mask[:, :-1]
    out[:, :-1] &= mask[:, 1:]
    out[0, :] = out[-1, :] = False
    out[:, 0] = out[:, -1] = False
    return out
