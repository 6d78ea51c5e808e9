"""The study's results section: tables, paired differences and figures from the finished runs.

`write_report` rewrites only the part of the markdown file between this preset's markers
(`<!-- study:<preset>:begin -->` … `end`), so the hand-written discussion around it and other
presets' sections survive a rerun. Everything inside is computed from the run folders: a fresh
clone that runs `make study` gets the same section (training is deterministic).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import torch
import yaml
from matplotlib.figure import Figure

from tagmoe_lit.data.interference import TWINS
from tagmoe_lit.data.synthtag import TASK_TAGS
from tagmoe_lit.figures import heatmap
from tagmoe_lit.io import atomic_write_text
from tagmoe_lit.metrics.knockout import to_markdown as knockout_markdown
from tagmoe_lit.study.paired import CANNOT_TELL, Paired, mean_std, paired
from tagmoe_lit.study.preset import Preset, Run
from tagmoe_lit.study.runs import fingerprint, load_done, run_dir

# Metrics of the tables (test_report per-sample names) and whether higher is better.
METRICS = {"success": True, "edit_accuracy": True, "preserve_accuracy": True, "psnr_preserved": True,
           "psnr_edit": True, "ssim_preserved": True, "flow_fixed": False}
SCOPES = {"local": "local editing", "global": "global editing", "customize": "content customization", "generate": "image generation"}


def task_groups(tasks: list[str]) -> dict[str, set[str]]:
    """{'all': every task, 'local': …, 'global': …, …}: SynthTAG tasks grouped by their Scope tag."""
    groups = {"all": set(tasks)}
    for short, scope in SCOPES.items():
        members = {t for t in tasks if scope in TASK_TAGS.get(t, {}).get("scope", [])}
        if members:
            groups[short] = members
    return groups


class Finished:
    """What the finished runs left behind, by variant and seed."""

    def __init__(self, preset: Preset, out: Path, extra: list[str]):
        self.preset, self.out = preset, out
        self.done: dict[str, dict[int, dict]] = defaultdict(dict)
        self.reports: dict[str, dict[int, dict]] = defaultdict(dict)
        for run in preset.runs():
            directory = run_dir(out, run)
            done = load_done(directory, fingerprint(run, extra, preset.curves))
            if done:
                self.done[run.variant][run.seed] = done
                self.reports[run.variant][run.seed] = json.loads((directory / "test_report.json").read_text())

    def variants(self) -> list[str]:
        return [v for v in self.preset.variants if v in self.reports]

    def samples(self, variant: str) -> dict[int, dict]:
        return {seed: r["per_sample"] for seed, r in self.reports[variant].items()}

    def directory(self, variant: str, seed: int) -> Path:
        return run_dir(self.out, Run(variant, seed, ()))

    def config(self, variant: str) -> dict:
        """The resolved config of the variant's first finished run (what Lightning saved)."""
        directory = self.directory(variant, min(self.done[variant]))
        return yaml.safe_load(next(directory.glob("tensorboard/version_*/config.yaml")).read_text())

    def tb_scalars(self, variant: str, seed: int, tags: list[str]) -> dict[str, list[tuple[int, float]]]:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        log_dir = next(self.directory(variant, seed).glob("tensorboard/version_*"))
        events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
        events.Reload()
        have = set(events.Tags()["scalars"])
        return {t: [(e.step, e.value) for e in events.Scalars(t)] for t in tags if t in have}


def _fmt(mean: float, std: float | None = None, digits: int = 3) -> str:
    if mean is None or math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def _group_mean(samples: dict, metric: str, tasks: set[str]) -> float:
    return mean_std([v for t, v in zip(samples["task"], samples[metric]) if t in tasks])[0]


def main_table(f: Finished, groups: dict[str, set[str]]) -> str:
    cols = [("success", g) for g in groups] + [("psnr_preserved", "local"), ("psnr_edit", "all"), ("flow_fixed", "all")]
    cols = [(m, g) for m, g in cols if g in groups]
    head = " | ".join(f"{m} ({g})" for m, g in cols)
    lines = [f"| variant | seeds | {head} | NMI per layer (shuffled) | fit min / run |", "|---" * (len(cols) + 4) + "|"]
    for v in f.variants():
        samples = f.samples(v)
        cells = [_fmt(*mean_std([_group_mean(s, m, groups[g]) for s in samples.values()])) for m, g in cols]
        routing = [r["routing"] for r in f.reports[v].values() if r["routing"]]
        nmi = "–"
        if routing:
            nmi = ", ".join(
                f"{_fmt(mean_std([r[layer]['nmi'] for r in routing])[0], digits=2)} ({_fmt(mean_std([r[layer]['nmi_shuffled'] for r in routing])[0], digits=2)})"
                for layer in routing[0])
        minutes = mean_std([d["fit_s"] / 60 for d in f.done[v].values()])[0]
        lines.append(f"| {v} | {len(samples)} | " + " | ".join(cells) + f" | {nmi} | {minutes:.1f} |")
    return "\n".join(lines) + "\n"


def _paired_cell(p: Paired | None, higher_better: bool) -> str:
    """The headline: mean over seeds of the per-seed mean difference, its 95 % seed-level
    t-interval, the number of seeds, and the verdict word taken from that interval alone."""
    if p is None:
        return "–"
    word = p.verdict(higher_better)
    word = word if word == CANNOT_TELL else f"**{word}**"
    interval = p.seed_interval
    if interval is None:
        return f"{p.seed_mean:+.4f} (1 seed: no interval) {word}"
    return f"{p.seed_mean:+.4f} [{interval[0]:+.4f}, {interval[1]:+.4f}] ({p.n_seeds} seeds) {word}"


def _seed_table(rows: list[tuple[str, str, Paired | None]], seeds: list[int]) -> list[str]:
    """Each seed's mean difference per (metric, tasks) row, so anyone can recompute the interval,
    and the pooled per-sample mean ± SE (number of samples): test-sample noise, no verdict."""
    lines = ["| metric | tasks | " + " | ".join(f"seed {s}" for s in seeds) + " | test-sample noise: per-sample mean ± SE (samples) |",
             "|---" * (len(seeds) + 3) + "|"]
    for metric, group, p in rows:
        if p is not None:
            by_seed = dict(zip(p.seeds, p.seed_means))
            cells = [f"{by_seed[s]:+.4f}" if s in by_seed else "–" for s in seeds]
            lines.append(f"| {metric} | {group} | " + " | ".join(cells) + f" | {p.mean:+.4f} ± {p.se:.4f} ({p.n}) |")
    return lines


def paired_tables(f: Finished, groups: dict[str, set[str]]) -> str:
    out = []
    for a, b in f.preset.compare:
        if a not in f.reports or b not in f.reports:
            continue
        seeds = sorted(set(f.reports[a]) & set(f.reports[b]))
        pairs = {(m, g): paired(f.samples(a), f.samples(b), m, tasks) for m in METRICS for g, tasks in groups.items()}
        lines = [f"#### {a} − {b}", "", "| metric | " + " | ".join(groups) + " |", "|---" * (len(groups) + 1) + "|"]
        for metric, higher_better in METRICS.items():
            lines.append(f"| {metric} | " + " | ".join(_paired_cell(pairs[metric, g], higher_better) for g in groups) + " |")
        lines += ["", f"Seeds {seeds}. Each cell: the mean over the n seeds of each seed's mean paired difference, "
                      "[95 % seed-level t-interval: mean ± t(0.975, n − 1) · sd / √n] (n seeds) and the verdict, taken from "
                      "that interval alone: **better** / **worse** when it excludes 0 (for flow_fixed lower is better), "
                      "cannot tell apart when it spans 0 or one seed gives none (seeds with equal means give a zero-width "
                      "interval). Below: each seed's mean difference, to recompute the interval, and the per-sample mean ± SE "
                      "pooled over every test sample of every seed: test-sample noise only (no training noise in it), so no "
                      "verdict rests on it.", ""]
        lines += _seed_table([(m, g, p) for (m, g), p in pairs.items()], seeds)
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


def per_task_table(f: Finished, metric: str) -> str:
    # every variant's tasks: in a dial preset they differ by level, and "all" must cover each run's own
    tasks = list(dict.fromkeys(t for by_seed in f.reports.values() for r in by_seed.values() for t in r["tasks"]))
    lines = [f"| task | " + " | ".join(f.variants()) + " |", "|---" * (len(f.variants()) + 1) + "|"]
    for task in tasks:
        cells = [_fmt(*mean_std([r["tasks"][task][metric] for r in f.reports[v].values() if task in r["tasks"]]))
                 for v in f.variants()]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def routing_figures(f: Finished, figures: Path, link: Path) -> str:
    """A task × expert heatmap (share of each task's tokens per top-1 expert) per MoE layer, first seed."""
    lines = []
    for v in f.variants():
        seed = min(f.reports[v])
        tasks = list(f.reports[v][seed]["tasks"])
        for layer, r in f.reports[v][seed]["routing"].items():
            share = torch.tensor(r["task_expert_share"])
            title = f"{v} seed {seed}, {layer}\nNMI {r['nmi']:.2f} (shuffled tasks {r['nmi_shuffled']:.2f})"
            path = figures / f"{f.preset.name}_routing_{v}_{layer}.png"
            heatmap(share, tasks, [f"e{e}" for e in range(share.shape[1])], title).savefig(path)
            lines.append(f"![{v} {layer}]({_rel(path, link)})")
    return "\n".join(lines) + "\n"


def curve_figures(f: Finished, figures: Path, link: Path) -> str:
    """Training flow loss of every variant (mean over seeds) and, where measured, success by step
    (a second panel only when some variant has curve points: an empty one would read as a failure)."""
    points = {v: json.loads(path.read_text()) for v in f.variants()
              if (path := f.directory(v, min(f.done[v])) / "curve.json").is_file()}
    fig = Figure(figsize=(10 if points else 5.5, 3.6), dpi=100)
    axes = fig.subplots(1, 2 if points else 1, squeeze=False)[0]
    loss_ax = axes[0]
    for v in f.variants():
        curves = [f.tb_scalars(v, seed, ["train/flow"]).get("train/flow", []) for seed in f.done[v]]
        curves = [c for c in curves if c]
        if curves:
            n = min(len(c) for c in curves)
            steps = [step for step, _ in curves[0][:n]]
            mean = [sum(c[i][1] for c in curves) / len(curves) for i in range(n)]
            k = max(1, n // 40)  # smooth: mean of k consecutive logged points
            loss_ax.plot(steps[k - 1 :: k], [sum(mean[i : i + k]) / k for i in range(0, n - k + 1, k)], label=v)
    loss_ax.set(xlabel="step", ylabel="train/flow", title="training flow loss (mean over seeds)", yscale="log")
    if points:
        success_ax = axes[1]
        for v, by_step in points.items():
            steps = [p["step"] for p in by_step]
            success_ax.plot(steps, [p["all"]["success"] for p in by_step], "o-", label=f"{v} success (all)")
            success_ax.plot(steps, [p["all"]["preserve_accuracy"] for p in by_step], "s--", label=f"{v} preserve accuracy")
        success_ax.set(xlabel="step", title=f"first seed, {f.preset.curves.test_samples} test samples: test metrics by step")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = figures / f"{f.preset.name}_curves.png"
    fig.savefig(path)
    return f"![curves]({_rel(path, link)})\n"


def dial_section(f: Finished, figures: Path, link: Path) -> str:
    """Experiment B: the primary metric's seed-level paired difference a − b (flow_fixed on all
    tasks) at every conflict level and width, as a table and as a plot with the 95 % intervals."""
    dial = f.preset.dial
    if dial is None:
        return "No dial in this preset.\n"
    fig = Figure(figsize=(5, 3.4), dpi=100)
    ax = fig.subplots()
    lines = [f"{dial.a} − {dial.b}, flow_fixed on all tasks (lower is better for {dial.a}):", "",
             "| width | " + " | ".join(f"conflict {lv}" for lv in dial.levels) + " |", "|---" * (len(dial.levels) + 1) + "|"]
    for width in dial.widths:
        cells, points = [], []
        for level in dial.levels:
            a, b = dial.variant(dial.a, level, width), dial.variant(dial.b, level, width)
            p = paired(f.samples(a), f.samples(b), "flow_fixed") if a in f.reports and b in f.reports else None
            cells.append(_paired_cell(p, higher_better=False))
            if p is not None:
                points.append((float(level), p.seed_mean, p.seed_interval))
        lines.append(f"| {width} | " + " | ".join(cells) + " |")
        if points:
            line, = ax.plot([x for x, _, _ in points], [y for _, y, _ in points], marker="o", label=width)
            for x, y, interval in points:  # a point without an interval (one seed) stays hollow: no claim
                if interval:
                    ax.errorbar([x], [y], yerr=[[y - interval[0]], [interval[1] - y]], color=line.get_color(), capsize=4)
                else:
                    ax.plot([x], [y], marker="o", color=line.get_color(), markerfacecolor="white")
    ax.axhline(0.0, color="gray", linewidth=0.8)
    ax.set(xlabel="conflict level (share of tasks with their twin)", ylabel=f"flow_fixed: {dial.a} − {dial.b}",
           title="seed-level 95 % intervals (hollow: one seed)", xticks=[float(level) for level in dial.levels])
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = figures / f"{f.preset.name}_dial.png"
    fig.savefig(path)
    return "\n".join([*lines, "", *learned_gate(f)]) + f"\n\n![dial]({_rel(path, link)})\n"


def learned_gate(f: Finished) -> list[str]:
    """Whether the gate model learned the conflicting edits at each level (first width): its mean
    edit success over seeds on every task trained beside its twin, against the preset's threshold,
    and beside it the same task's success at a level where it trains without its twin (the drop
    between the two is the interference the gate model itself suffers)."""
    dial = f.preset.dial
    if not dial.gate:
        return []
    width = dial.widths[0]
    runs = {level: f.reports[v] for level in dial.levels if (v := dial.variant(dial.gate, level, width)) in f.reports}

    def success(level: str, task: str) -> float:
        return mean_std([r["tasks"][task]["success"] for r in runs[level].values()])[0]

    trained = {level: next(iter(reports.values()))["tasks"] for level, reports in runs.items()}
    alone = {t: success(level, t) for level, tasks in trained.items() for t in tasks if TWINS.get(t) not in tasks}
    lines = [f"Learned gate ({dial.gate} at {width}, edit success on the tasks trained with their twin, "
             f"mean over its seeds, and in brackets the task trained without its twin; learned means ≥ {dial.learned:g} on each):", ""]
    for level in dial.levels:
        if level not in runs:
            lines.append(f"- conflict {level}: no finished {dial.variant(dial.gate, level, width)} run")
            continue
        twinned = {t: success(level, t) for t in trained[level] if TWINS.get(t) in trained[level]}
        cells = ", ".join(f"{t} {v:.2f}" + (f" (alone {alone[t]:.2f})" if t in alone else "") for t, v in twinned.items())
        word = "no task has its twin" if not twinned else ("learned" if min(twinned.values()) >= dial.learned else "**not learned**")
        lines.append(f"- conflict {level}: {cells + ' → ' if cells else ''}{word} ({len(runs[level])} seed(s))")
    return lines


def knockout_table(f: Finished) -> str:
    out = []
    for v in f.preset.knockout:
        for seed in sorted(f.done.get(v, {})):
            path = f.directory(v, seed) / "knockout.json"
            if path.is_file():
                results = json.loads(path.read_text(), parse_constant=float)
                results = {k: {"tasks": {t: {m: math.nan if x is None else x for m, x in row.items()} for t, row in r["tasks"].items()}}
                           for k, r in results.items()}
                out.append(f"{v}, seed {seed}: change when expert e is removed from every MoE layer\n\n"
                           + knockout_markdown(results, "success") + "\n" + knockout_markdown(results, "flow_fixed"))
    return "\n".join(out) or "No knockout run finished.\n"


def heldout_table(f: Finished) -> str:
    """Variants trained with `holdout_tasks`: their numbers on the held-out tasks, and paired against each other."""
    held = {v: tuple(f.config(v)["data"]["init_args"].get("holdout_tasks") or ()) for v in f.variants()}
    held = {v: t for v, t in held.items() if t}
    if not held:
        return "No held-out run finished.\n"
    lines = ["| variant | held-out tasks | " + " | ".join(f"{m} (held out)" for m in ("success", "preserve_accuracy", "flow_fixed"))
             + " | flow_fixed (trained tasks) |", "|---" * 6 + "|"]
    for v, tasks in held.items():
        samples = f.samples(v)
        trained = set(samples[min(samples)]["task"]) - set(tasks)
        cells = [_fmt(*mean_std([_group_mean(s, m, set(tasks)) for s in samples.values()])) for m in ("success", "preserve_accuracy", "flow_fixed")]
        cells.append(_fmt(*mean_std([_group_mean(s, "flow_fixed", trained) for s in samples.values()])))
        lines.append(f"| {v} | {', '.join(tasks)} | " + " | ".join(cells) + " |")
    names = list(held)
    for a, b in zip(names, names[1:]):
        pairs = {m: paired(f.samples(a), f.samples(b), m, set(held[a])) for m in ("success", "preserve_accuracy", "psnr_edit", "flow_fixed")}
        cells = [f"{m} {_paired_cell(p, METRICS[m])}" for m, p in pairs.items()]
        lines += ["", f"Paired {a} − {b} on the held-out tasks (seed-level 95 % t-intervals, as above): " + "; ".join(cells) + ".", ""]
        lines += _seed_table([(m, "held out", p) for m, p in pairs.items()], sorted(set(f.reports[a]) & set(f.reports[b])))
    return "\n".join(lines) + "\n"


def wall_times(f: Finished) -> str:
    lines = ["| run | steps | threads | fit s | test s | curve s | knockout s |", "|---" * 7 + "|"]
    total = 0.0
    for v in f.variants():
        for seed, d in sorted(f.done[v].items()):
            total += sum(x for k, x in d.items() if k.endswith("_s"))
            lines.append(f"| {v}/seed{seed} | {d['steps']} | {d.get('torch_threads', '–')} | {d['fit_s']:.0f} | {d['test_s']:.0f} | "
                         f"{d.get('curve_s', 0):.0f} | {d.get('knockout_s', 0):.0f} |")
    return "\n".join(lines) + f"\n\nTotal: {total / 60:.1f} min.\n"


def _rel(path: Path, link: Path) -> str:
    try:
        return str(path.resolve().relative_to(link.resolve().parent))
    except ValueError:
        return str(path.resolve())


def section(f: Finished, figures: Path, link: Path) -> str:
    # every variant's tasks: in a dial preset they differ by level, and "all" must cover each run's own
    tasks = list(dict.fromkeys(t for by_seed in f.reports.values() for r in by_seed.values() for t in r["tasks"]))
    groups = task_groups(tasks)
    base = ", ".join(f"`{c}`" for c in f.preset.base)
    parts = [
        f"### Preset `{f.preset.name}`: {base}",
        "Seed-mean ± std over seeds of each run's test numbers (all test samples; groups by Scope tag: "
        + "; ".join(f"{g} = {', '.join(sorted(t))}" for g, t in groups.items() if g != "all") + ").",
        main_table(f, groups),
        "#### Paired differences", paired_tables(f, groups),
        *(["#### Task interference: the gap against conflict level and width", dial_section(f, figures, link)] if f.preset.dial else []),
        "#### Edit success per task", per_task_table(f, "success"),
        "#### Flow loss at fixed σ per task", per_task_table(f, "flow_fixed"),
        "#### Routing", routing_figures(f, figures, link),
        "#### Curves", curve_figures(f, figures, link),
        "#### Expert knockout", knockout_table(f),
        "#### Held-out task combinations", heldout_table(f),
        "#### Wall time per run", wall_times(f),
    ]
    return "\n\n".join(p.strip("\n") for p in parts) + "\n"


def write_report(preset: Preset, out: Path, extra: list[str], report: Path, figures: Path) -> Path:
    """(Re)write this preset's section of `report` from the finished runs under `out`."""
    f = Finished(preset, out, extra)
    if not f.reports:
        raise FileNotFoundError(f"No finished study run under {out}; run `python -m tagmoe_lit study --preset …` first.")
    figures.mkdir(parents=True, exist_ok=True)
    begin, end = f"<!-- study:{preset.name}:begin (generated by `python -m tagmoe_lit study`; edits here are overwritten) -->", f"<!-- study:{preset.name}:end -->"
    body = f"{begin}\n{section(f, figures, report)}{end}"
    text = report.read_text(encoding="utf-8") if report.is_file() else "# Results\n\n"
    start, stop = text.find(begin.split(" (")[0] + " "), text.find(end)  # "<!-- study:<name>:begin ", never another preset's
    text = text[:start] + body + text[stop + len(end):] if start >= 0 and stop > start else text.rstrip("\n") + "\n\n" + body + "\n"
    atomic_write_text(report, text)
    print(f"Wrote the {preset.name} section of {report} (figures in {figures}).")
    return report
