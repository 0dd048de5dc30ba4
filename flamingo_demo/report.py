"""report.md of `flamingo demo`: the few-shot table, the goals (goals.py) with their numbers, the plots (plots.py),
sample generations with their images, wall time per stage, the package versions and the commands to reproduce."""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil

import torch
import transformers

from flamingo.eval.tasks import get_task

from .goals import breakdown, cell, fmt, goals, headline, reached, skipped_queries
from .plots import gate_names, plot_fewshot, plot_training, training_metrics
from .run import SHOTS, TASKS, DemoRun

REPORT = "report.md"


def _breakdown_table(run: DemoRun, task: str) -> list[str]:
    """One row per part (e.g. VQA question type), one column per shot count and variant."""
    columns = {(v, k): breakdown(run, v, task, k) for v in run.results for k in run.settings.shots}
    columns = {key: parts for key, parts in columns.items() if parts}
    if not columns:
        return []
    lines = [f"{task} by question type:", "",
             "| type | " + " | ".join(f"{v} {k}-shot" for v, k in columns) + " |", "|---|" + "---|" * len(columns)]
    for part in sorted({p for parts in columns.values() for p in parts}):
        lines.append(f"| {part} | " + " | ".join(fmt(parts.get(part), task) for parts in columns.values()) + " |")
    return lines + [""]


def _multi_image(run: DemoRun) -> list[str]:
    """The multi-image questions: what they are, and each variant's accuracy per question type."""
    if not any("multi_image" in tasks for tasks in run.results.values()):
        return []
    lines = ["## Multi-image questions", "",
             "2-3 held-out images a query, declared MMICL-style (`Image 0 is <image0>. Image 1 is <image1>.`), then a "
             "question naming one or two of them: `multi_image` names them by reference (`What colour is the object "
             "in <image1>?`, `Are <image0> and <image2> the same shape?`): a token sees the image of the last image "
             "or reference before it. `multi_image_plain` asks the same questions naming the images in words "
             "(`image 1`): every token after the declarations then sees the last image only. "
             "The images of a query differ in kind and colour (but for a `yes` pair in the attribute asked), so "
             "an answer read off another image than the one named is wrong. "
             + ("`all-images` is the model trained with `only_attend_last_image=false` (every token sees every "
                "image before it). " if "all-images" in run.results else ""), ""]
    return lines + _breakdown_table(run, "multi_image") + _breakdown_table(run, "multi_image_plain")


def _hand_prompts(run: DemoRun) -> list[str]:
    """The hand-written prompts, their images, what `flamingo generate` answered, and the commands."""
    if not run.generations:
        return []
    out = run.settings.out
    lines = ["## `flamingo generate` on prompts written by hand", "",
             "Few-shot prompts written as a user would (flamingo_demo/tryit.py), on images drawn fresh from the "
             "world (never a training image), run as `flamingo generate` runs them (the commands below). "
             "The binding prompt's words occur "
             "in no training text, and its query is the first kind again, so copying the latest word is wrong.", "",
             "| prompt | images (the last is the query) | answer | expected | right |", "|---|---|---|---|---|"]
    for g in run.generations:
        images = " ".join(f"![]({os.path.relpath(p, out)})" for p in g["images"])
        answer = cell(g["output"]) or "(nothing)"
        lines.append(f"| `{cell(g['prompt'])}` | {images} | {answer} | {g['expected']} | {reached(g['correct'])} |")
    lines += ["", "```bash"] + [g["command"] for g in run.generations] + ["```", ""]
    return lines


def _samples(run: DemoRun, out: str, count: int = 4) -> list[str]:
    """Sample VQA and video-QA generations of the trained model at 4 shots (or the largest), with their images."""
    lines = []
    k = 4 if 4 in run.settings.shots else max(run.settings.shots)
    os.makedirs(os.path.join(out, "report_images"), exist_ok=True)
    for task in ("vqa", "videoqa", "captioning"):
        pred_path = os.path.join(out, "eval", "flamingo", task, "predictions", f"{task}_{k}shot_trial0.jsonl")
        if not os.path.exists(pred_path):
            continue
        data_dir = run.world["eval"][task]["dir"]
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


def package_versions() -> str:
    """Python, torch and transformers versions, as the report states them."""
    return f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}"


def reproduce_command(run: DemoRun) -> str:
    """The `flamingo demo` command line of this run, shell-quoted: its settings, `--shots` when not the default."""
    s = run.settings
    args = ["flamingo", "demo", "--out", s.out, "--size", s.size, "--seed", str(s.seed),
            "--train-procs", str(s.train_procs), "--eval-procs", str(s.eval_procs)]
    if tuple(s.shots) != tuple(SHOTS):
        args += ["--shots", *(str(k) for k in s.shots)]
    if s.ablate:
        args += ["--ablate", s.ablate]
    return shlex.join(args)


def write_report(run: DemoRun) -> str:
    s = run.settings
    out = s.out
    plot_fewshot(run, os.path.join(out, "fewshot.png"))
    for variant in run.models:
        plot_training(run, variant, os.path.join(out, f"gates_{variant}.png"), os.path.join(out, f"loss_{variant}.png"))
    lines = ["# flamingo demo: a mini Flamingo grown offline", "",
             f"Size `{s.size}`, seed {s.seed}, shots {list(s.shots)}. Every number below was produced by this run.", "",
             "## Reproduce", "", "```bash",
             reproduce_command(run),
             "```", "", f"A rerun on the same machine with the same package versions ({package_versions()}) reproduces "
             "every number: the world, the backbones, the Flamingo stage and the evaluation are bit-reproducible on "
             "CPU. Other versions of these packages (transformers above all) change the last bits of the "
             "computations, so the weights and some predictions differ. The Flamingo stage is the ordinary trainer"
             + (f", in {s.train_procs} DDP processes of one thread each (a dataset's `batch_size` is per process, "
                "so the demo divides mini.yaml's batches by the number of processes)"
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
            cells = [fmt(headline(run, variant, task, k), task) for k in s.shots]
            lines.append(f"| {variant} | {task} ({TASKS[task][1]}) | " + " | ".join(cells) + " |")
    chance = run.world["eval"]["binding"].get("chance")
    if chance:
        lines += ["", f"Binding chance level: {100 * chance:.1f}%."]
    skipped = skipped_queries(run)
    if skipped:
        lines += ["", "Not run (the prompt and its answer need more positions than the LM's "
                      f"{run.backbones.get('lm', {}).get('context', 'n/a')}-token window; the cell is over the rest): "
                  + "; ".join(skipped) + "."]
    lines += [""] + _breakdown_table(run, "vqa") + _multi_image(run)
    lines += ["![few-shot](fewshot.png)", "", "## Goals", "", "| goal | reached | numbers |", "|---|---|---|"]
    lines += [f"| {g} | {reached(ok)} | {nums} |" for g, ok, nums in goals(run)]

    lines += ["", "## Training", ""]
    for variant in run.models:
        rows = training_metrics(run, variant)
        if rows:
            lines.append(f"- `{variant}`: {rows[-1]['step']} steps, loss {rows[0]['loss']:.3f} "
                         f"(step {rows[0]['step']}) -> {rows[-1]['loss']:.3f}; "
                         f"final gates per layer ({', '.join(gate_names(run))}): "
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
