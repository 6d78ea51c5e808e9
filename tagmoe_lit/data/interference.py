"""The interference dial (issue 16, experiment B): SynthTAG global edits, some with an opposite twin.

Every operation maps a SynthTAG scene (drawn as relight and stylize draw theirs) to an exact target
on uint8, so success is measured, not judged. Twins undo each other (darken ↔ brighten in direction,
colour rotation ↔ its reverse exactly): trained together, the instruction alone decides between two
targets that pull the same weights in opposite directions. `CONFLICT_LEVELS` fixes four tasks per
level and varies the share of them whose twin is trained too; the `interference` tag schema gives
each operation its own type tag. SynthTAG serves these tasks on request (`tasks: [...]`); its
default draw stays its nine tasks. relight and stylize use the same pixel operations.
"""

from __future__ import annotations

from typing import Callable

import torch


def darker(s: torch.Tensor) -> torch.Tensor:
    return s // 2


def brighter(s: torch.Tensor) -> torch.Tensor:
    return s + (255 - s) // 2


def gray(s: torch.Tensor) -> torch.Tensor:
    r, g, b = s.to(torch.int32).unbind(0)
    return ((77 * r + 150 * g + 29 * b) >> 8).to(torch.uint8).expand(3, -1, -1).contiguous()  # weights sum to 256: exact


# name → (instruction, target of the source); "rotate" moves red to green, green to blue, blue to red
DIAL_OPS: dict[str, tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = {
    "darken": ("make the image darker", darker),
    "brighten": ("make the image brighter", brighter),
    "invert": ("invert the colors", lambda s: 255 - s),
    "grayscale": ("convert the image to grayscale", gray),
    "rotate": ("turn red into green, green into blue and blue into red", lambda s: s[[2, 0, 1]].contiguous()),
    "unrotate": ("turn red into blue, blue into green and green into red", lambda s: s[[1, 2, 0]].contiguous()),
}


# Tags under the `interference` schema: one type tag per operation, scope and preservation shared.
DIAL_TASK_TAGS: dict[str, dict[str, list[str]]] = {
    name: {"scope": ["global editing"], "type": [kind], "preservation": ["structure preservation"]}
    for name, kind in (("darken", "darkening"), ("brighten", "brightening"), ("invert", "colour inversion"),
                       ("grayscale", "grayscale conversion"), ("rotate", "colour rotation"),
                       ("unrotate", "reverse colour rotation"))
}
TWINS = {"darken": "brighten", "brighten": "darken", "rotate": "unrotate", "unrotate": "rotate"}
CONFLICT_LEVELS: dict[str, tuple[str, ...]] = {  # four tasks each; the share of them with their twin present
    "0": ("darken", "invert", "grayscale", "rotate"),
    "0.5": ("darken", "brighten", "invert", "grayscale"),
    "1": ("darken", "brighten", "rotate", "unrotate"),
}
