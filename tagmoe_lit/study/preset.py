"""A study preset: which variants to train, on which seeds, under which budget, compared how.

A preset is a YAML file (`experiments/study/cpu.yaml`, `gpu.yaml`):

    base: [experiments/base.yaml, experiments/study/cpu_budget.yaml]   # configs every run starts from
    seeds: [0, 1, 2]                                                   # default seeds of a variant
    variants:
      dense: {configs: [experiments/dense.yaml]}
      tagmoe: {configs: []}
      heldout_tagmoe: {configs: [experiments/study/variants/heldout.yaml], seeds: [0]}
    compare: [[tagmoe, dense], …]      # paired differences a − b, on the samples both saw
    curves: {variants: [dense, tagmoe], every_n_steps: 300, test_samples: 144}
    knockout: [tagmoe]                 # expert knockout on the first seed's checkpoint
    dial: {a: tagmoe, b: agnostic, levels: ["0", "1"], widths: [w128]}  # a − b against conflict level (variants a_c0_w128, …)

Every run is `fit` then `test` with `base + configs` and, per seed s, `seed_everything: s` and
`model.seed: s` (weights and noise). The data seed stays the base's: every run sees the same
batches in the same order and is tested on the same samples with, for a given seed, the same
noise, so two variants' test numbers can be compared sample by sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

_KEYS = {"base", "seeds", "variants", "compare", "curves", "knockout", "dial"}
_DIAL_KEYS = {"a", "b", "levels", "widths", "gate", "learned"}
_VARIANT_KEYS = {"configs", "seeds"}
_CURVE_KEYS = {"variants", "every_n_steps", "test_samples"}


class PresetError(ValueError):
    """A study preset that cannot be run as written."""


@dataclass(frozen=True)
class Run:
    """One training run of the study: a variant on one seed."""

    variant: str
    seed: int
    configs: tuple[str, ...]  # base configs, then the variant's
    curve: bool = False  # also test intermediate checkpoints (success curve)
    knockout: bool = False  # also run the expert knockout on the final checkpoint

    @property
    def name(self) -> str:
        return f"{self.variant}/seed{self.seed}"



@dataclass(frozen=True)
class Curves:
    variants: tuple[str, ...] = ()
    every_n_steps: int = 0
    test_samples: int = 144


@dataclass(frozen=True)
class Dial:
    """Experiment B's grid: the report plots variant `a` − variant `b` (variants named
    `{model}_c{level}_{width}`) against the conflict level, one line per width. `gate` names the
    model whose edit success on the twin tasks at the first width must reach `learned` for a level's
    gap to speak about interference (a model that never learns the edits cannot suffer from them)."""

    a: str
    b: str
    levels: tuple[str, ...]
    widths: tuple[str, ...]
    gate: str | None = None
    learned: float = 0.8

    @staticmethod
    def variant(model: str, level: str, width: str) -> str:
        return f"{model}_c{level}_{width}"

    def names(self) -> list[str]:
        gates = [self.variant(self.gate, lv, self.widths[0]) for lv in self.levels] if self.gate and self.widths else []
        return [self.variant(m, lv, w) for m in (self.a, self.b) for lv in self.levels for w in self.widths] + gates


@dataclass(frozen=True)
class Preset:
    name: str
    base: tuple[str, ...]
    variants: dict[str, tuple[tuple[str, ...], tuple[int, ...]]]  # name → (configs, seeds)
    compare: tuple[tuple[str, str], ...] = ()
    curves: Curves = field(default_factory=Curves)
    knockout: tuple[str, ...] = ()
    dial: Dial | None = None

    @classmethod
    def load(cls, path: str | Path, root: str | Path = ".") -> "Preset":
        """Read and check a preset; config paths are relative to `root` (the repository)."""
        path, root = Path(path), Path(root)
        if not path.is_file():
            raise PresetError(f"Study preset {path} does not exist; shipped presets are experiments/study/cpu.yaml and gpu.yaml.")
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        where = f"Study preset {path}"
        if not isinstance(raw, dict):
            raise PresetError(f"{where}: expected a mapping with keys {sorted(_KEYS)}.")
        _no_unknown(raw, _KEYS, where)
        seeds = _seeds(raw.get("seeds", [0]), where)
        variants: dict[str, tuple[tuple[str, ...], tuple[int, ...]]] = {}
        for name, spec in (raw.get("variants") or {}).items():
            spec = spec or {}
            _no_unknown(spec, _VARIANT_KEYS, f"{where}, variant {name}")
            variants[str(name)] = (tuple(spec.get("configs") or ()), _seeds(spec.get("seeds", seeds), f"{where}, variant {name}"))
        if not variants:
            raise PresetError(f"{where}: 'variants' is empty; name at least one variant with its configs.")
        base = tuple(raw.get("base") or ())
        missing = [p for p in {*base, *(c for cfg, _ in variants.values() for c in cfg)} if not (root / p).is_file()]
        if missing:
            raise PresetError(f"{where}: config file(s) {sorted(missing)} do not exist under {root.resolve()}.")
        compare = tuple(tuple(pair) for pair in raw.get("compare") or ())
        curves_raw = raw.get("curves") or {}
        _no_unknown(curves_raw, _CURVE_KEYS, f"{where}, curves")
        curves = Curves(tuple(curves_raw.get("variants", ())), int(curves_raw.get("every_n_steps", 0)), int(curves_raw.get("test_samples", 144)))
        knockout = tuple(raw.get("knockout") or ())
        dial = None
        if raw.get("dial") is not None:
            _no_unknown(raw["dial"], _DIAL_KEYS, f"{where}, dial")
            d = raw["dial"]
            dial = Dial(str(d.get("a", "")), str(d.get("b", "")), tuple(map(str, d.get("levels") or ())), tuple(map(str, d.get("widths") or ())),
                        None if d.get("gate") is None else str(d["gate"]), float(d.get("learned", Dial.learned)))
        named = [*(v for pair in compare for v in pair), *curves.variants, *knockout, *(dial.names() if dial else ())]
        unknown = sorted({v for v in named if v not in variants})
        bad_pairs = [p for p in compare if len(p) != 2]
        if unknown or bad_pairs:
            problem = f"names unknown variant(s) {unknown}" if unknown else f"has comparisons {bad_pairs} that are not [a, b] pairs"
            raise PresetError(f"{where} {problem}; variants: {list(variants)}.")
        if curves.variants and curves.every_n_steps < 1:
            raise PresetError(f"{where}: curves.every_n_steps must be a positive step count.")
        return cls(path.stem, base, variants, compare, curves, knockout, dial)

    def only_seeds(self, seeds: list[int]) -> "Preset":
        """The same preset restricted to `seeds` (variants left with none are dropped)."""
        variants = {name: (configs, tuple(s for s in own if s in seeds)) for name, (configs, own) in self.variants.items()}
        return replace(self, variants={name: v for name, v in variants.items() if v[1]})

    def only_variants(self, names: list[str]) -> "Preset":
        """The same preset restricted to the variants `names` (to spend compute on one question first)."""
        unknown = sorted(set(names) - set(self.variants))
        if unknown:
            raise PresetError(f"Study preset {self.name} has no variant(s) {unknown}; its variants: {list(self.variants)}.")
        return replace(self, variants={name: v for name, v in self.variants.items() if name in names})

    def runs(self) -> list[Run]:
        """Every run, seed-major (all variants of the first seed first: a partial study is balanced)."""
        order = sorted({s for _, seeds in self.variants.values() for s in seeds})
        out = []
        for seed in order:
            for name, (configs, seeds) in self.variants.items():
                if seed in seeds:
                    first = seed == seeds[0]
                    out.append(Run(name, seed, (*self.base, *configs), first and name in self.curves.variants,
                                   first and name in self.knockout))
        return out


def _seeds(value, where: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(s, int) and not isinstance(s, bool) for s in value):
        raise PresetError(f"{where}: seeds must be a non-empty list of integers, got {value!r}.")
    return tuple(value)


def _no_unknown(mapping, allowed: set[str], where: str) -> None:
    if not isinstance(mapping, dict):
        raise PresetError(f"{where}: expected a mapping with keys {sorted(allowed)}, got {mapping!r}.")
    unknown = set(mapping) - allowed
    if unknown:
        raise PresetError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}.")
