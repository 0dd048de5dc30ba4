"""The demo's goals, checked against a run's numbers: each goal, whether this run reached it (None: not measured),
and the numbers behind it. Also the headline numbers the report renders (`headline`, `breakdown`)."""

from __future__ import annotations

import os
from typing import Optional

from .run import TASKS, DemoRun


def _means(run: DemoRun, variant: str, task: str, shots: int) -> dict[str, Optional[float]]:
    """Every metric's mean over trials at `shots` (the harness's summary rows)."""
    results = run.results.get(variant, {}).get(task)
    return {row["metric"]: row["mean"] for row in (results or {}).get("summary", []) if row["shots"] == shots}


def headline(run: DemoRun, variant: str, task: str, shots: int) -> Optional[float]:
    return _means(run, variant, task, shots).get(TASKS[task][1])


def breakdown(run: DemoRun, variant: str, task: str, shots: int) -> dict[str, float]:
    """The headline metric's parts (`metric/part` rows of the harness, e.g. VQA accuracy per question type)."""
    prefix = TASKS[task][1] + "/"
    return {m[len(prefix):]: v for m, v in _means(run, variant, task, shots).items()
            if m.startswith(prefix) and v is not None}


def skipped_queries(run: DemoRun) -> list[str]:
    """`variant task k-shot: n of N` for every cell the harness skipped queries of (longer than max_length)."""
    out = []
    for variant, tasks in run.results.items():
        for task, results in tasks.items():
            for r in results.get("runs", []):
                if r.get("skipped"):
                    out.append(f"{variant} {task} {r['shots']}-shot: {r['skipped']} of {results['num_samples']}")
    return out


def fmt(value: Optional[float], task: str) -> str:
    if value is None:
        return "n/a"
    return f"{value:.1f}" if task == "captioning" else f"{value:.1f}%"  # the harness reports percent (CIDEr x100)


# The demo's time goal (#7): the whole demo, from scratch, on 2 CPU cores.
TIME_GOAL_S = 600.0


def time_goal(run: DemoRun) -> tuple[str, Optional[bool], str]:
    """Whether this run shows the whole demo in <= 10 minutes on 2 CPU cores: None (not measured) when a stage was
    reused from an earlier run or the machine does not have 2 cores."""
    total, cores = run.times["total"], os.cpu_count() or 1
    stages = ", ".join(f"{name} {t:.0f} s" for name, t in run.times.items() if name not in ("total", "report"))
    goal = f"the whole demo (size `{run.settings.size}`) in <= 10 minutes on 2 CPU cores, from scratch"
    numbers = f"total {total:.0f} s ({stages})"
    if run.reused:
        return goal, None, numbers + f"; not from scratch: reused {', '.join(run.reused)} from an earlier run"
    if cores != 2:
        return goal, None, numbers + f"; this machine has {cores} cores, not 2"
    return goal, total <= TIME_GOAL_S, numbers


def generate_goal(run: DemoRun) -> Optional[tuple[str, bool, str]]:
    """`flamingo generate` answers few-shot prompts written by hand (the binding prompt is shown but not part of
    this goal: the binding goals above cover it)."""
    if not run.generations:
        return None
    asked = [g for g in run.generations if not g["binding"]]
    numbers = "; ".join(f"{g['name']}: {g['answer'] or cell(repr(g['output']))} (expected {g['expected']})"
                        + ("" if not g["binding"] else ", not part of this goal") for g in run.generations)
    return ("`flamingo generate` answers few-shot prompts written by hand", all(g["correct"] for g in asked),
            f"{sum(g['correct'] for g in asked)} of {len(asked)} right; {numbers}")


# The multi-image task's question types: one image named (its colour, its shape), or two compared.
ONE_IMAGE, TWO_IMAGES = ("colour", "shape"), ("same_colour", "same_shape")


def multi_image_goals(run: DemoRun, shots: list[int]) -> list[tuple[str, Optional[bool], str]]:
    """Questions naming held-out images by reference: >= 90% for one named image and for two compared, best over
    shots (each type's queries weigh equally); references beat naming the images in words at every shot count."""
    out: list[tuple[str, Optional[bool], str]] = []
    ref = {k: v for k in shots if (v := headline(run, "flamingo", "multi_image", k)) is not None}
    if not ref:
        return out
    parts = {k: breakdown(run, "flamingo", "multi_image", k) for k in ref}
    for what, types in (("one image named", ONE_IMAGE), ("two images compared", TWO_IMAGES)):
        means = {k: sum(p.get(t, 0.0) for t in types) / len(types) for k, p in parts.items()
                 if all(t in p for t in types)}
        if means:
            best = max(means, key=lambda k: means[k])
            out.append((f"multi-image, {what} by reference (`{'`, `'.join(types)}`): >= 90% (best over shots)",
                        means[best] >= 90, f"{best}-shot {fmt(means[best], 'multi_image')} ("
                        + ", ".join(f"{t} {fmt(parts[best][t], 'multi_image')}" for t in types) + ")"))
    plain = {k: headline(run, "flamingo", "multi_image_plain", k) for k in ref}
    if all(v is not None for v in plain.values()):
        out.append(("multi-image: references beat naming the images in words, at every shot count",
                    all(ref[k] > plain[k] for k in ref),  # type: ignore[operator]
                    "; ".join(f"{k}-shot {fmt(ref[k], 'multi_image')} vs {fmt(plain[k], 'multi_image')}"
                              for k in ref)))
    return out


def goals(run: DemoRun) -> list[tuple[str, Optional[bool], str]]:
    """(goal, reached (None: not measured by this run), the numbers) for each goal of the demo."""
    shots = list(run.settings.shots)
    out = []
    chance = run.world["eval"]["binding"].get("chance")
    b = {k: headline(run, "flamingo", "binding", k) for k in shots}
    if 0 in b and b[0] is not None and chance:
        out.append(("binding: chance at 0-shot (within 15 points)", abs(b[0] - 100 * chance) <= 15,
                    f"0-shot {fmt(b[0], 'binding')} vs chance {100 * chance:.1f}%"))
    if b.get(4) is not None:
        lm = run.backbones.get("lm", {})
        note = f"; the frozen LM's in-context copy gain: {lm['copy_gain']} nats/token" if "copy_gain" in lm else ""
        if "word_recall" in lm:
            note += f", its recall of fresh words from its context: {100 * lm['word_recall']:.0f}% (chance 50%)"
        if "assoc_recall" in lm:
            note += f", its recall of a kind's word in text: {100 * lm['assoc_recall']:.0f}% (chance 50%)"
        out.append(("binding: >= 90% at 4-shot", b[4] >= 90, f"4-shot {fmt(b[4], 'binding')}{note}"))
    vals = [b[k] for k in shots if b.get(k) is not None]
    if vals:
        monotone = all(later >= earlier - 2 for earlier, later in zip(vals, vals[1:]))
        out.append(("binding: accuracy does not fall as shots increase (0->8, 2-point tolerance)", monotone,
                    " -> ".join(fmt(v, "binding") for v in vals)))
    best_vqa = max((v for k in shots if (v := headline(run, "flamingo", "vqa", k)) is not None), default=None)
    if best_vqa is not None:
        out.append(("attribute VQA on held-out images >= 90%", best_vqa >= 90,
                    f"best over shots {fmt(best_vqa, 'vqa')}"))
    out += multi_image_goals(run, shots)
    for task in TASKS:
        k = 4 if 4 in shots else shots[-1]
        ours, zero = headline(run, "flamingo", task, k), headline(run, "flamingo-gates0", task, k)
        if ours is not None and zero is not None:
            out.append((f"{task}: trained beats gates=0 ({k}-shot)", ours > zero,
                        f"{fmt(ours, task)} vs {fmt(zero, task)}"))
    generated = generate_goal(run)
    if generated is not None:
        out.append(generated)
    out.append(time_goal(run))
    return out


def reached(ok: Optional[bool]) -> str:
    return "not measured" if ok is None else "yes" if ok else "**no**"


def cell(text: str) -> str:
    """`text` inside one markdown table cell: one line, its pipes escaped."""
    return " ".join(text.split("\n")).replace("|", "\\|")
