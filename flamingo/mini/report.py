"""report.md of `flamingo demo`: the few-shot table, the goals checked against the numbers, plots (metric vs shots
per task, tanh gate values per layer over training, training losses), sample generations with their images, wall
time per stage and the commands to reproduce."""

from __future__ import annotations

import json
import os
import shutil
from typing import TYPE_CHECKING, Any, Optional

from .sizes import get_size

if TYPE_CHECKING:
    from .demo import DemoRun

REPORT = "report.md"


def _means(run: "DemoRun", variant: str, task: str, shots: int) -> dict[str, Optional[float]]:
    """Every metric's mean over trials at `shots` (the harness's summary rows)."""
    results = run.results.get(variant, {}).get(task)
    return {row["metric"]: row["mean"] for row in (results or {}).get("summary", []) if row["shots"] == shots}


def headline(run: "DemoRun", variant: str, task: str, shots: int) -> Optional[float]:
    from .demo import TASKS

    return _means(run, variant, task, shots).get(TASKS[task][1])


def breakdown(run: "DemoRun", variant: str, task: str, shots: int) -> dict[str, float]:
    """The headline metric's parts (`metric/part` rows of the harness, e.g. VQA accuracy per question type)."""
    from .demo import TASKS

    prefix = TASKS[task][1] + "/"
    return {m[len(prefix):]: v for m, v in _means(run, variant, task, shots).items()
            if m.startswith(prefix) and v is not None}


def _breakdown_table(run: "DemoRun", task: str) -> list[str]:
    """One row per part (e.g. VQA question type), one column per shot count and variant."""
    columns = {(v, k): breakdown(run, v, task, k) for v in run.results for k in run.settings.shots}
    columns = {key: parts for key, parts in columns.items() if parts}
    if not columns:
        return []
    lines = [f"{task} by question type:", "",
             "| type | " + " | ".join(f"{v} {k}-shot" for v, k in columns) + " |", "|---|" + "---|" * len(columns)]
    for part in sorted({p for parts in columns.values() for p in parts}):
        lines.append(f"| {part} | " + " | ".join(_fmt(parts.get(part), task) for parts in columns.values()) + " |")
    return lines + [""]


def skipped_queries(run: "DemoRun") -> list[str]:
    """`variant task k-shot: n of N` for every cell the harness skipped queries of (longer than max_length)."""
    out = []
    for variant, tasks in run.results.items():
        for task, results in tasks.items():
            for r in results.get("runs", []):
                if r.get("skipped"):
                    out.append(f"{variant} {task} {r['shots']}-shot: {r['skipped']} of {results['num_samples']}")
    return out


def _fmt(value: Optional[float], task: str) -> str:
    if value is None:
        return "n/a"
    return f"{value:.1f}" if task == "captioning" else f"{value:.1f}%"  # the harness reports percent (CIDEr x100)


# The demo's time goal (#7): the whole demo, from scratch, on 2 CPU cores.
TIME_GOAL_S = 600.0


def time_goal(run: "DemoRun") -> tuple[str, Optional[bool], str]:
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


def generate_goal(run: "DemoRun") -> Optional[tuple[str, bool, str]]:
    """`flamingo generate` answers few-shot prompts written by hand (the binding prompt is shown but not part of
    this goal: the binding goals above cover it)."""
    if not run.generations:
        return None
    asked = [g for g in run.generations if not g["binding"]]
    numbers = "; ".join(f"{g['name']}: {g['answer'] or _cell(repr(g['output']))} (expected {g['expected']})"
                        + ("" if not g["binding"] else ", not part of this goal") for g in run.generations)
    return ("`flamingo generate` answers few-shot prompts written by hand", all(g["correct"] for g in asked),
            f"{sum(g['correct'] for g in asked)} of {len(asked)} right; {numbers}")


def goals(run: "DemoRun") -> list[tuple[str, Optional[bool], str]]:
    """(goal, reached (None: not measured by this run), the numbers) for each goal of the demo."""
    from .demo import TASKS

    shots = list(run.settings.shots)
    out = []
    chance = run.world["eval"]["binding"].get("chance")
    b = {k: headline(run, "flamingo", "binding", k) for k in shots}
    if 0 in b and b[0] is not None and chance:
        out.append(("binding: chance at 0-shot (within 15 points)", abs(b[0] - 100 * chance) <= 15,
                    f"0-shot {_fmt(b[0], 'binding')} vs chance {100 * chance:.1f}%"))
    if b.get(4) is not None:
        lm = run.backbones.get("lm", {})
        note = f"; the frozen LM's in-context copy gain: {lm['copy_gain']} nats/token" if "copy_gain" in lm else ""
        if "word_recall" in lm:
            note += f", its recall of fresh words from its context: {100 * lm['word_recall']:.0f}% (chance 50%)"
        if "assoc_recall" in lm:
            note += f", its recall of a kind's word in text: {100 * lm['assoc_recall']:.0f}% (chance 50%)"
        out.append(("binding: >= 90% at 4-shot", b[4] >= 90, f"4-shot {_fmt(b[4], 'binding')}{note}"))
    vals = [b[k] for k in shots if b.get(k) is not None]
    if vals:
        monotone = all(later >= earlier - 2 for earlier, later in zip(vals, vals[1:]))
        out.append(("binding: accuracy does not fall as shots increase (0->8, 2-point tolerance)", monotone,
                    " -> ".join(_fmt(v, "binding") for v in vals)))
    best_vqa = max((v for k in shots if (v := headline(run, "flamingo", "vqa", k)) is not None), default=None)
    if best_vqa is not None:
        out.append(("attribute VQA on held-out images >= 90%", best_vqa >= 90,
                    f"best over shots {_fmt(best_vqa, 'vqa')}"))
    for task in TASKS:
        k = 4 if 4 in shots else shots[-1]
        ours, zero = headline(run, "flamingo", task, k), headline(run, "flamingo-gates0", task, k)
        if ours is not None and zero is not None:
            out.append((f"{task}: trained beats gates=0 ({k}-shot)", ours > zero,
                        f"{_fmt(ours, task)} vs {_fmt(zero, task)}"))
    generated = generate_goal(run)
    if generated is not None:
        out.append(generated)
    out.append(time_goal(run))
    return out


def _reached(ok: Optional[bool]) -> str:
    return "not measured" if ok is None else "yes" if ok else "**no**"


def _cell(text: str) -> str:
    """`text` inside one markdown table cell: one line, its pipes escaped."""
    return " ".join(text.split("\n")).replace("|", "\\|")


def _hand_prompts(run: "DemoRun") -> list[str]:
    """The hand-written prompts, their images, what `flamingo generate` answered, and the commands."""
    if not run.generations:
        return []
    out = run.settings.out
    lines = ["## `flamingo generate` on prompts written by hand", "",
             "Few-shot prompts written as a user would (flamingo/mini/tryit.py), on images drawn fresh from the "
             "world (never a training image), through the CLI's own entry point. The binding prompt's words occur "
             "in no training text, and its query is the first kind again, so copying the latest word is wrong.", "",
             "| prompt | images (the last is the query) | answer | expected | right |", "|---|---|---|---|---|"]
    for g in run.generations:
        images = " ".join(f"![]({os.path.relpath(p, out)})" for p in g["images"])
        answer = _cell(g["output"]) or "(nothing)"
        lines.append(f"| `{_cell(g['prompt'])}` | {images} | {answer} | {g['expected']} | {_reached(g['correct'])} |")
    lines += ["", "```bash"] + [g["command"] for g in run.generations] + ["```", ""]
    return lines


def _plot_fewshot(run: "DemoRun", path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .demo import TASKS

    fig, axes = plt.subplots(1, len(TASKS), figsize=(3.6 * len(TASKS), 3.2), squeeze=False)
    for ax, task in zip(axes[0], TASKS):
        for variant in run.results:
            xs = [k for k in run.settings.shots if headline(run, variant, task, k) is not None]
            ax.plot(xs, [headline(run, variant, task, k) for k in xs], marker="o", label=variant)
        if task == "binding" and run.world["eval"]["binding"].get("chance"):
            ax.axhline(100 * run.world["eval"]["binding"]["chance"], color="grey", ls="--", lw=1, label="chance")
        ax.set_title(f"{task} ({TASKS[task][1]})")
        ax.set_xlabel("shots")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _metrics(run: "DemoRun", variant: str) -> list[dict[str, Any]]:
    path = os.path.join(run.settings.out, variant, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    rows: dict[int, dict[str, Any]] = {}
    with open(path) as f:
        for line in f:
            m = json.loads(line)
            rows[m["step"]] = m
    return [rows[k] for k in sorted(rows)]


def _gate_names(run: "DemoRun") -> tuple[str, str]:
    """What the logged gate values are: tanh of scalar gates, or the mean |tanh| of vector (per-channel) gates. Every
    variant of a run trains with its size's gate type (demo.train_overrides)."""
    if get_size(run.settings.size).flamingo_gate_type == "vector":
        return "mean |tanh(attention gate)|", "mean |tanh(dense gate)|"
    return "tanh(attention gate)", "tanh(dense gate)"


def _plot_training(run: "DemoRun", variant: str, gates_path: str, loss_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _metrics(run, variant)
    if not rows:
        return
    steps = [m["step"] for m in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for layer in rows[0]["gates"]:
        axes[0].plot(steps, [m["gates"][layer][0] for m in rows], label=f"layer {layer}")
        axes[1].plot(steps, [m["gates"][layer][1] for m in rows], label=f"layer {layer}")
    for ax, name in zip(axes, _gate_names(run)):
        ax.set_title(f"{variant}: {name}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(gates_path, dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for key in [k for k in rows[0] if k.startswith("loss/")]:
        ax.plot(steps, [m.get(key) for m in rows], label=key[5:])
    ax.set_title(f"{variant}: training loss per dataset")
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(loss_path, dpi=100)
    plt.close(fig)


def _samples(run: "DemoRun", out: str, count: int = 4) -> list[str]:
    """Sample VQA and video-QA generations of the trained model at 4 shots (or the largest), with their images."""
    lines = []
    k = 4 if 4 in run.settings.shots else max(run.settings.shots)
    os.makedirs(os.path.join(out, "report_images"), exist_ok=True)
    for task in ("vqa", "videoqa", "captioning"):
        pred_path = os.path.join(out, "eval", "flamingo", task, "predictions", f"{task}_{k}shot_trial0.jsonl")
        if not os.path.exists(pred_path):
            continue
        data_dir = run.world["eval"][task]["dir"]
        from ..eval.tasks import get_task

        samples = {s.id: s for s in get_task(task).load(data_dir, "test")}
        with open(pred_path) as f:
            records = [json.loads(line) for line in f][:count]
        lines += [f"**{task}, {k}-shot** (held-out media):", "", "| media | prompt | model | reference |",
                  "|---|---|---|---|"]
        for r in records:
            sample = samples.get(str(r["id"]))
            if sample is None:
                continue
            media = sample.media[-1]
            name = f"{task}_{os.path.basename(media)}"
            shutil.copy(media, os.path.join(out, "report_images", name))
            shown = f"![]({'report_images/' + name})" if not name.endswith((".mp4", ".webm", ".mkv")) \
                else f"[video](report_images/{name})"
            question = sample.fields.get("question", "")
            reference = sample.answer
            lines.append(f"| {shown} | {question} | {r.get('prediction', r.get('answer', ''))} | {reference} |")
        lines.append("")
    return lines


def write_report(run: "DemoRun") -> str:
    from .demo import TASKS

    s = run.settings
    out = s.out
    _plot_fewshot(run, os.path.join(out, "fewshot.png"))
    for variant in run.models:
        _plot_training(run, variant, os.path.join(out, f"gates_{variant}.png"), os.path.join(out, f"loss_{variant}.png"))
    lines = ["# flamingo demo: a mini Flamingo grown offline", "",
             f"Size `{s.size}`, seed {s.seed}, shots {list(s.shots)}. Every number below was produced by this run.", "",
             "## Reproduce", "", "```bash",
             f"flamingo demo --out {out} --size {s.size} --seed {s.seed} --train-procs {s.train_procs} "
             f"--eval-procs {s.eval_procs}"
             + (f" --ablate {s.ablate}" if s.ablate else ""),
             "```", "", "A rerun on the same machine reproduces every number: the world, the backbones and the "
             "Flamingo stage are bit-reproducible on CPU (on 2026-11-24, two runs of the `fast` size wrote "
             "byte-identical weights with the Flamingo stage in one process, and two more with it in two processes; "
             "so did two smoke runs in two processes). The "
             "Flamingo stage is the ordinary trainer"
             + (f", in {s.train_procs} DDP processes of one thread each (a dataset's `batch_size` is per process, "
                "so the demo divides configs/mini.yaml's batches by the number of processes)"
                if s.train_procs > 1 else "") + ":", "", "```bash"]
    lines += [run.commands[v] for v in run.commands] + ["```", ""]

    first = next(iter(run.results.values()), {})  # every variant evaluates the same queries
    queries = ", ".join(f"{task} {r.get('num_samples', 'n/a')}" for task, r in first.items())
    lines += ["## Few-shot results", "",
              "Held-out images (and held-out kind x colour combinations) for every task; binding uses nonsense words "
              "never seen in training, bound to object kinds by the demos of each 2- or 3-way episode; a binding "
              "shot is one demo of each word (n-way k-shot, shots counted per word as in Frozen's fast binding). "
              "`flamingo-gates0` is the trained model with every tanh gate set to 0 (the frozen LM alone). "
              f"Queries per cell: {queries}.", "",
              "| model | task (metric) | " + " | ".join(f"{k}-shot" for k in s.shots) + " |",
              "|---|---|" + "---|" * len(s.shots)]
    for variant in run.results:
        for task in TASKS:
            cells = [_fmt(headline(run, variant, task, k), task) for k in s.shots]
            lines.append(f"| {variant} | {task} ({TASKS[task][1]}) | " + " | ".join(cells) + " |")
    chance = run.world["eval"]["binding"].get("chance")
    if chance:
        lines += ["", f"Binding chance level: {100 * chance:.1f}%."]
    skipped = skipped_queries(run)
    if skipped:
        lines += ["", "Not run (the prompt and its answer need more positions than the LM's "
                      f"{run.backbones.get('lm', {}).get('context', 'n/a')}-token window; the cell is over the rest): "
                  + "; ".join(skipped) + "."]
    lines += [""] + _breakdown_table(run, "vqa")
    lines += ["![few-shot](fewshot.png)", "", "## Goals", "", "| goal | reached | numbers |", "|---|---|---|"]
    lines += [f"| {g} | {_reached(ok)} | {nums} |" for g, ok, nums in goals(run)]

    lines += ["", "## Training", ""]
    for variant in run.models:
        rows = _metrics(run, variant)
        if rows:
            lines.append(f"- `{variant}`: {rows[-1]['step']} steps, loss {rows[0]['loss']:.3f} "
                         f"(step {rows[0]['step']}) -> {rows[-1]['loss']:.3f}; "
                         f"final gates per layer ({', '.join(_gate_names(run))}): "
                         + ", ".join(f"{k}: ({a:.2f}, {d:.2f})" for k, (a, d) in rows[-1]["gates"].items()))
            lines += ["", f"![gates](gates_{variant}.png) ![loss](loss_{variant}.png)", ""]
    bb = run.backbones
    lines += ["## Backbones (grown here, frozen during Flamingo training)", ""]
    if "vision" in bb:
        v = bb["vision"]
        lines.append(f"- vision tower (CLIPVisionModel, {v.get('params', 0):,} parameters, contrastive pretraining, "
                     f"{v.get('steps')} steps): held-out image->text retrieval top-1 "
                     f"{100 * v.get('retrieval_top1', 0):.1f}% (chance {100 * v.get('retrieval_chance', 0):.1f}%), "
                     f"top-5 {100 * v.get('retrieval_top5', 0):.1f}%")
    if "lm" in bb:
        m = bb["lm"]
        stopped = ""
        if "induction_step" in m:  # the size probed its in-context recall to stop early
            stopped = (f" of at most {m['max_steps']}; its in-context recall probe, every {m['probe_every']} steps, "
                       + (f"first passed at step {m['induction_step']}" if m["induction_step"] is not None
                          else "never passed"))
        lines.append(f"- causal LM (LlamaForCausalLM, {m.get('params', 0):,} parameters, {m.get('steps')} steps"
                     f"{stopped}): "
                     f"held-out perplexity {m.get('heldout_ppl')}; in-context copying: a repeated random token "
                     f"sequence is {m.get('copy_gain')} nats/token easier the second time (about 0 means the LM "
                     f"cannot copy from its context, which in-context binding needs)"
                     + (f"; recall of fresh words from its context (`This is a A. This is a B. ... This is a` ranks A "
                        f"or B above two unseen words): {100 * m['word_recall']:.0f}% (chance 50%)"
                        if "word_recall" in m else "")
                     + (f"; recall of a kind's word (`This is a circle A. This is a star B. ... This is a circle` "
                        f"ranks A above B): {100 * m['assoc_recall']:.0f}% (chance 50%)"
                        if "assoc_recall" in m else ""))
    if "tokenizer" in bb:
        lines.append(f"- byte-level BPE tokenizer: {bb['tokenizer'].get('vocab_size')} tokens")
    lines.append("")
    lines += ["## Sample generations", ""] + _samples(run, out)
    lines += _hand_prompts(run)
    lines += [f"## Wall time per stage ({os.cpu_count()} CPU cores)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {t:.1f} |" for name, t in run.times.items()]
    path = os.path.join(out, REPORT)
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path
