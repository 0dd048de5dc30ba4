"""`evaluate`: a task over shots x trials -> results (results.json, results.md, results.png in `out_dir`).

Every trial uses seed `seed + trial` (its query set and random demos); the evaluated samples are the same in every
trial (the first `num_samples` of a shuffle by `seed`, kept in file order), so the spread over trials is the spread
due to the demos. Metrics are in percent; the summary is mean ± std (population std, as OpenFlamingo) over trials.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
from tqdm import tqdm

from ..chat import chat_format_for
from ..model.feature_cache import VisionFeatureCache
from ..model.flamingo import Flamingo
from ..processing import FlamingoProcessor
from ..runtime import figure, init_process_group_from_env
from ..runtime.checkpoint_io import atomic_file
from ..runtime.hub import HF_DATASET, dataset_dir
from .demos import (
    ZERO_SHOT_TEXT_DEMOS,
    DemoSelector,
    QuerySet,
    check_query_set,
    check_zero_shot,
    effective_query_set,
    prompt_demos,
    rices_demos,
    seeded_prompts,
)
from .distributed import all_gather, broadcast, rank, shard, world_size
from .extras import check_requirements
from .predict import MediaLoader, build_prompt, generate_batch, needed_tokens, rank_batch
from .remote import RemoteModel
from .rices import FeatureCache
from .task import Sample, Task
from .tasks import get_task
from .vqa import VQATask

# why a query is not run (a record's `skip_reason`), as results.md says it
SKIP_REASONS = {"too_long": "longer than the model's max_length",
                "unreadable_media": "with an image or video that cannot be read",
                "too_many_media": "with more images or videos than the server takes per prompt"}
MAX_UNREADABLE_FRACTION = 0.5  # more of a run's queries with unreadable media: the data is wrong, stop


def select_samples(samples: Sequence[Sample], num_samples: Optional[int], seed: int) -> list[Sample]:
    """The evaluated subset: all, or `num_samples` drawn with `seed`, kept in file order."""
    if num_samples is None or num_samples >= len(samples):
        return list(samples)
    if num_samples <= 0:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    chosen = np.random.default_rng(seed).choice(len(samples), size=num_samples, replace=False)
    return [samples[i] for i in sorted(chosen)]


def load_split(task: Task, local: str, split: str, data_dir: str) -> list[Sample]:
    """`task.load(local, split)`, a record lacking a field its task reads (or of another shape) named as such: a
    ValueError naming the split and the data, which the CLI prints as one line (a file that is not UTF-8: named by
    `task.read_text`)."""
    try:
        return task.load(local, split)
    except KeyError as e:
        raise ValueError(f"{task.name}: a record of the {split} split of {data_dir!r} lacks the field {e} "
                         "(layouts: docs/eval.md)") from e
    except (TypeError, IndexError, AttributeError) as e:  # a string or object where a list is read; an index past it
        raise ValueError(f"{task.name}: the {split} split of {data_dir!r} is not in the task's layout ({e}; "
                         "layouts: docs/eval.md)") from e


def load_pool(task: Task, local: str, data_dir: str, needed: bool) -> list[Sample]:
    """The train split (the demo pool). When no demo is drawn (`needed` False: 0 shots, zero-shot "none") a
    test-only download is fine: missing train files give an empty pool. Loaded when present all the same, as a
    task may take its class list from both splits (classification)."""
    try:
        return load_split(task, local, "train", data_dir)
    except FileNotFoundError:
        if needed:
            raise
        return []


def predict(model: Union[Flamingo, RemoteModel], processor: FlamingoProcessor, task: Task, samples: Sequence[Sample],
            selector: DemoSelector, shots: int, *, zero_shot: str = "text", batch_size: int = 8,
            loader: Optional[MediaLoader] = None, progress: bool = True, description: str = "",
            generation: Optional[dict[str, Any]] = None, vision_cache: Optional[VisionFeatureCache] = None
            ) -> list[dict[str, Any]]:
    """Prediction records of `samples` (this rank's shard: strided, gathered in index order on every rank). A query
    that needs more positions than `processor.max_length` (its prompt plus the longest candidate, or plus the new
    tokens), or whose prompt holds an image or video that cannot be read, is not run: its record holds `skipped`
    (why) and `skip_reason` (one of SKIP_REASONS) instead of a prediction, and `evaluate` counts it."""
    check_zero_shot(zero_shot)
    loader = loader or MediaLoader(processor)
    n = len(samples)
    mine = shard(n)
    rices = rices_demos(selector, samples, mine, shots, zero_shot)  # the whole shard's at once (RICES only)
    local: list[tuple[int, dict[str, Any]]] = []
    limit = processor.max_length  # the LM's positions (None: unknown, nothing is skipped)
    # a server's limit on a prompt's media (its `--max-images`): a query past it is skipped here, counted, rather
    # than the run ending at the first such request, after the other shot counts ran
    most_media = model.max_images() if isinstance(model, RemoteModel) else None
    new_tokens = int(task.generation_settings(generation)["max_new_tokens"]) if task.kind == "generate" else 0
    # a context: the bar is closed when a batch raises (an interrupted notebook cell), so later bars keep their line
    with tqdm(total=len(mine), desc=description, disable=not progress or rank() != 0) as bar:
        for start in range(0, len(mine), batch_size):
            indices, prompts, chosen = [], [], []
            for i in mine[start:start + batch_size]:
                demos, with_media = rices[i] if i in rices else prompt_demos(selector, samples[i], i, shots, zero_shot)
                prompt = build_prompt(task, samples[i], demos, with_media)
                demo_ids = [d.id for d in demos]
                if limit is not None and (needed := needed_tokens(processor, task, samples[i], prompt[0], new_tokens,
                                                                  fed_last=isinstance(model, RemoteModel))) > limit:
                    local.append((i, {"id": samples[i].id, "skipped": f"needs {needed} tokens, max_length is {limit}",
                                      "skip_reason": "too_long", "demo_ids": demo_ids}))
                    continue
                if most_media is not None and len(prompt[1]) > most_media:
                    local.append((i, {"id": samples[i].id, "skip_reason": "too_many_media", "demo_ids": demo_ids,
                                      "skipped": f"{len(prompt[1])} images/videos, the server takes {most_media}"}))
                    continue
                if (why := loader.unreadable(prompt[1])) is not None:  # its own or a demo's image / video
                    local.append((i, {"id": samples[i].id, "skipped": why, "skip_reason": "unreadable_media",
                                      "demo_ids": demo_ids}))
                    continue
                indices.append(i)
                prompts.append(prompt)
                chosen.append(demo_ids)
            if not indices:
                records = []
            elif isinstance(model, RemoteModel):  # the same prompts, predicted by a server
                records = model.generate_batch(processor, loader, task, prompts, **(generation or {})) \
                    if task.kind == "generate" else model.rank_batch(processor, loader, task,
                                                                     [samples[i] for i in indices], prompts)
            elif task.kind == "generate":
                records = generate_batch(model, processor, loader, task, prompts, vision_cache=vision_cache,
                                         seed=(selector.seed, indices[0]), **(generation or {}))
            else:
                records = rank_batch(model, processor, loader, task, [samples[i] for i in indices], prompts,
                                     vision_cache=vision_cache)
            for i, record, demo_ids in zip(indices, records, chosen):
                local.append((i, {"id": samples[i].id, **record, "demo_ids": demo_ids}))
            bar.update(len(mine[start:start + batch_size]))
    return all_gather(local, n)


def evaluate(model: Union[Flamingo, RemoteModel], processor: FlamingoProcessor, task: Union[str, Task],
             data_dir: str, *,
             shots: Sequence[int] = (0, 4, 8, 32), trials: int = 3, demos: str = "random",
             query_set: QuerySet = None, num_samples: Optional[int] = None, batch_size: int = 8,
             out_dir: Optional[str] = None, seed: int = 0, zero_shot: str = "text", template: Optional[str] = None,
             answer_prefix: Optional[str] = None, model_name: Optional[str] = None, progress: bool = True,
             generation: Optional[dict[str, Any]] = None, cider_tokenizer: str = "auto",
             vision_cache_mb: Optional[float] = None, chat: bool = False,
             demo_separator: Optional[str] = None, rank_by: Optional[str] = None,
             demo_answer: Optional[str] = None, caption_demos: Optional[str] = None) -> dict[str, Any]:
    """Few-shot evaluation of `model` on `task` (a name from `flamingo.eval.TASKS` or a `Task`) read from `data_dir`;
    `model` in-process, or a `RemoteModel` (a server predicts; random demos, greedy decoding: eval/remote.py).

    shots: numbers of demos (run in increasing order, duplicates dropped); trials: seeds `seed .. seed + trials - 1`
    (seed >= 0); demos: "random" or "rices"; query_set: the train samples demos come from, a number drawn per seed or
    "all" (None: 2048 for random demos, the whole split for RICES, as OpenFlamingo; results.json's
    `settings.query_set` is the number used); num_samples: evaluated test samples (None = all);
    batch_size: prompts per `generate` call, or per `score_batch` call for ranked tasks; zero_shot: "text" (2
    text-only demos) or "none"; template: overrides the task's prompt template (answer_prefix: the text between query
    and answer, "" or " "); generation: overrides of the task's generation settings (max_new_tokens, num_beams, ...);
    vision_cache_mb: budget of the frozen tower's features kept by frame content across queries and shots (demo
    images recur: each is encoded once), 0 = off; None: 256 for a tower on the CPU, off on an accelerator, where
    hashing a frame's pixels on the host costs about as much as the tower (docs/eval.md). Cached features come from
    another batch, so they can differ from a fresh computation in the last bits. chat: demos and query as a
    conversation in the model's chat format (its processor's template; `Task.use_chat`), for instruction-tuned models.
    demo_separator: the text after each demo of a template prompt (None: the task's, "\\n" for VQA and captioning as
    OpenFlamingo, else ""; `Task.demo_separator`); not with `chat`, whose format separates the turns.
    rank_by: how a ranked task scores a candidate: "sum" (its continuation's summed log-likelihood) or "mean" (the
    mean over the candidate's own tokens, OpenFlamingo's ImageNet and HatefulMemes ranking); None: the task's.
    demo_answer: which answer a VQA demo shows: "consensus" (its `multiple_choice_answer`, the default) or "first"
    (its first human answer, as OpenFlamingo's evaluate.py; `VQATask.demo_answer`); refused for other tasks.
    caption_demos: the Karpathy splits captioning's demos come from: "train+restval" (the default) or "train" (as
    OpenFlamingo's evaluate.py; `CaptioningTask.caption_demos`); refused for other tasks.
    model_name: what the results call the model (default: the directory it was loaded from, `model.name_or_path`,
    else its LM's name; a server's URL).
    Writes predictions/*.jsonl, results.json, results.md and results.png (with matplotlib) to `out_dir` (rank 0)
    after each run (a number of shots in a trial), results.json listing the runs still to do as `unfinished` until
    the last, so that an evaluation that stops keeps the runs it finished. `out_dir` holds one task's evaluation: a
    re-run of the task replaces it, another task's results there are refused before the first query
    (`out_dir_problem`). A package the task's metric or media need (`Task.requires`: CIDEr's
    pycocoevalcap, scikit-learn, PyAV) missing is refused first (`check_requirements`). Returns the results dict (the
    content of results.json) on every rank.
    """
    init_process_group_from_env()
    if isinstance(task, str):
        task = get_task(task, template=template, answer_prefix=answer_prefix, cider_tokenizer=cider_tokenizer,
                        demo_separator=demo_separator, rank_by=rank_by, demo_answer=demo_answer,
                        caption_demos=caption_demos)
    elif any(v is not None for v in (template, answer_prefix, demo_separator, rank_by, demo_answer, caption_demos)):
        raise ValueError("pass `template` / `answer_prefix` / `demo_separator` / `rank_by` / `demo_answer` / "
                         "`caption_demos` only with a task name (a Task instance has its own)")
    check_requirements(task)  # its metric's and media's packages, before the first query rather than after a pass
    if chat and demo_separator is not None:
        raise ValueError("demo_separator applies to template prompts: with chat, the chat format separates the turns")
    # every call sets the task's chat format (None: its template) and clears its continuation ids, which depend on
    # the processor's tokenizer: a Task instance evaluated again, with another model or without chat, starts clean
    # the model's output rows decide the format (an IDEFICS model without a row for `<end_of_utterance>`: turns end
    # with the line break alone), as served; a server's model: the tokenizer's size
    vocab = None if isinstance(model, RemoteModel) else model.lm.get_output_embeddings().weight.shape[0]
    task.use_chat(chat_format_for(processor, vocab) if chat else None)
    shots = sorted(dict.fromkeys(int(k) for k in shots))  # one run per number of shots, in the table's order
    if any(k < 0 for k in shots) or not shots:
        raise ValueError(f"shots must be non-negative numbers, got {shots}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0 (numpy's seeds are non-negative), got {seed}")
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_query_set(query_set)
    check_zero_shot(zero_shot)  # before the model's first query
    for key in ("max_new_tokens", "num_beams"):
        if key in (generation or {}) and int(generation[key]) < 1:
            raise ValueError(f"generation's {key} must be >= 1, got {generation[key]}")
    if (problem := broadcast(out_dir_problem(out_dir, task.name) if rank() == 0 else None)) is not None:
        raise ValueError(problem)  # checked now (on rank 0, which writes): the results are written after every query
    remote = isinstance(model, RemoteModel)
    if remote and demos == "rices":
        raise ValueError("RICES ranks demos by the vision tower's features: evaluate in-process, or with "
                         "--demos random against a server")
    if not remote:
        model.eval()
    elif (positions := model.positions()) is not None:  # the served LM's window bounds the prompts, as in-process
        processor.max_length = min(processor.max_length or positions, positions)
    local = dataset_dir(data_dir, f"{task.name} data")  # a directory, or a Hub dataset's (hf://datasets/...)
    needs_pool = any(k > 0 for k in shots) or zero_shot == "text"
    pool = load_pool(task, local, data_dir, needs_pool)
    test = load_split(task, local, "test", data_dir)
    if dups := sorted(i for i, n in Counter(s.id for s in test).items() if n > 1):
        # records and CIDEr's inputs are keyed by id: one id twice would be written and scored once
        raise ValueError(f"{task.name}: the test split of {data_dir!r} has duplicate sample ids {dups[:5]}")
    samples = select_samples(test, num_samples, seed)
    if not samples:
        raise ValueError(f"{task.name}: the test split of {data_dir!r} is empty")
    task.check_fields([*samples, *pool])
    if task.image_references:  # every image of a prompt is declared and may be referred to
        per_demo = max((len(s.media) for s in pool), default=0)
        # a query's own images and its demos' (an n-way episode shows `ways` demos a shot)
        needed = max(len(s.media) + max(shots) * (s.ways or 1) * per_demo for s in samples)
        if processor.num_references < needed:
            raise ValueError(f"{task.name} at {max(shots)} shots declares up to {needed} images a prompt, but the "
                             f"model has reference tokens for {processor.num_references} (FlamingoConfig."
                             "num_image_references)")
    if needs_pool and not pool and any(s.demo_ids is None for s in samples):
        raise ValueError(f"{task.name}: the train split of {data_dir!r} is empty: no demos to draw")
    drawn = [s for s in samples if s.demo_ids is None]  # queries whose demos come from the query set
    owns = own_counts(drawn, pool) if needs_pool else []
    overlap = max(owns, default=0)
    drawable = effective_query_set(demos, query_set, len(pool))  # the demo selector's query set
    # checked before the smaller shots run; a query in the train split too may not draw itself
    if drawn and max(shots) > drawable - overlap:
        raise ValueError(f"{task.name}: {max(shots)} shots asked, but the query set holds {drawable} demos (the "
                         f"train split of {data_dir!r} has {len(pool)})"
                         + (f", up to {overlap} of them a query itself" if overlap else ""))
    check_episodes(task.name, samples, pool, shots, zero_shot)
    if overlap and rank() == 0:
        warnings.warn(f"{task.name}: {sum(n > 0 for n in owns)} of {len(samples)} evaluated samples are also in the "
                      f"train split of {data_dir!r} (the same first media file); each is kept out of its own "
                      "demos", stacklevel=2)
    loader = MediaLoader(processor)
    # demo images recur across queries and shots: the frozen tower encodes each frame once per evaluation
    if vision_cache_mb is None:
        vision_cache_mb = 256 if not remote and next(model.vision.parameters()).device.type == "cpu" else 0
    vision_cache = VisionFeatureCache.of_mib(vision_cache_mb) if not remote and model.config.freeze_vision else None
    features = FeatureCache(model, loader, batch_size=max(batch_size, 32), progress=progress) \
        if demos == "rices" else None
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    # named by: model_name, else the server, or the directory the model was loaded from, else its LM's name
    model_name = model_name or (model.base_url if remote else getattr(model, "name_or_path", None)
                                or model.config.lm_name_or_path) or "flamingo"
    base = {"task": task.name, "model": model_name, "date": date, "num_samples": len(samples)}
    header = {
        **base, "data": recorded_data(data_dir),
        "settings": {"shots": shots, "trials": trials, "seed": seed, "demos": demos, "query_set": drawable,
                     "zero_shot": zero_shot, "template": task.template,
                     "chat": task.chat.name if task.chat is not None else None,
                     "demo_separator": task.demo_separator if task.chat is None else None,
                     "answer_prefix": task.answer_prefix, "batch_size": batch_size,
                     "world_size": world_size(), "kind": task.kind,
                     "rank_by": task.rank_by if task.kind == "rank" else None,
                     "demo_answer": task.demo_answer if isinstance(task, VQATask) else None,
                     "caption_demos": getattr(task, "caption_demos", None) if task.name == "captioning" else None,
                     "generation": task.generation_settings(generation) if task.kind == "generate" else None,
                     **weights_format(model)},
    }

    def assemble(runs: list[dict[str, Any]]) -> dict[str, Any]:
        results = {**header, "runs": runs, "summary": summarize(runs, task.metrics)}
        if "tokenizer" in runs[0]:
            results["tokenizer"] = runs[0]["tokenizer"]
        return results

    runs, predictions = [], {}
    unwritten: dict[tuple[int, int], list[dict[str, Any]]] = {}  # each run's prediction file is written once
    for trial in range(trials):
        trial_seed = seed + trial
        selector = DemoSelector(pool, demos, query_set, trial_seed, features)
        if needs_pool and pool and any(s.demo_ids is None for s in samples):
            selector.prepare()  # RICES: the ranks split the query set's features (all ranks, before any shard work)
        for k in shots:
            if trial > 0 and not seeded_prompts(demos, query_set, len(pool), samples, k, zero_shot) \
                    and not (generation or {}).get("do_sample"):
                # the same prompts as trial 0's, decoded deterministically: its predictions, not a recomputation
                records = predictions[(k, 0)]
                repeats = {"repeats_trial": 0}
            else:
                records = predict(model, processor, task, samples, selector, k, zero_shot=zero_shot,
                                  batch_size=batch_size, loader=loader, progress=progress,
                                  description=f"{task.name} {k}-shot trial {trial}", generation=generation,
                                  vision_cache=vision_cache)
                repeats = {}
            kept = [(sample, r) for sample, r in zip(samples, records) if "skipped" not in r]
            skipped_by = dict(sorted(Counter(r["skip_reason"] for r in records if "skipped" in r).items()))
            check_unreadable(records, data_dir)
            metrics = task.compute_metrics([sample for sample, _ in kept], [r for _, r in kept]) \
                if rank() == 0 and kept else {}  # every query too long: no metric at k shots
            metrics = broadcast(metrics)
            extra = {"tokenizer": metrics.pop("tokenizer")} if "tokenizer" in metrics else {}
            runs.append({**base, "shots": k, "trial": trial, "seed": trial_seed, "metrics": metrics,
                         "skipped": len(samples) - len(kept), "skipped_by": skipped_by, **extra, **repeats})
            predictions[(k, trial)] = records
            unwritten[(k, trial)] = records
            unfinished = [{"shots": j, "trial": t} for t in range(trials) for j in shots
                          if (j, t) not in predictions]
            if out_dir is not None and rank() == 0 and unfinished:  # a run that fails later keeps these
                write_results({**assemble(runs), "unfinished": unfinished}, unwritten, out_dir, warn=False,
                              replace=len(runs) == 1)
                unwritten = {}
    results = assemble(runs)
    if out_dir is not None and rank() == 0:
        write_results(results, unwritten, out_dir, replace=len(runs) == 1)
    unreadable = {r["skipped"] for rs in predictions.values() for r in rs if r.get("skip_reason") == "unreadable_media"}
    if unreadable and rank() == 0:
        warnings.warn(f"{task.name}: media of {data_dir!r} could not be read ({len(unreadable)} file(s)); the queries "
                      f"prompted with them were skipped and counted (runs' skipped_by), e.g. {min(unreadable)}",
                      stacklevel=2)
    return results


def weights_format(model: Union[Flamingo, RemoteModel]) -> dict[str, Optional[str]]:
    """The weights an in-process model evaluated with: its dtype (the embedding's: quantization leaves it) and its
    frozen backbones' `quantize_frozen` mode, so that a float and a quantized evaluation of one model are told apart
    by their results; None for a server's model, which the server loaded."""
    if isinstance(model, RemoteModel):
        return {"dtype": None, "quantize_frozen": None}
    dtype = model.lm.get_input_embeddings().weight.dtype
    return {"dtype": str(dtype).removeprefix("torch."), "quantize_frozen": model.config.quantize_frozen}


def recorded_data(data_dir: str) -> str:
    """`data_dir` as results.json records it: a Hub dataset as named, a local folder by its absolute path, so that
    one folder given as `okvqa` (from /data) and as `/data/okvqa` is one dataset to `flamingo push --results`."""
    data_dir = os.fspath(data_dir)
    return data_dir if HF_DATASET.match(data_dir) else os.path.abspath(data_dir)


def check_unreadable(records: Sequence[dict[str, Any]], data_dir: str) -> None:
    """Raise when more than MAX_UNREADABLE_FRACTION of a run's queries were skipped for unreadable media: a wrong
    media root or a partial download, not a few corrupt files."""
    bad = [r for r in records if r.get("skip_reason") == "unreadable_media"]
    if records and len(bad) / len(records) > MAX_UNREADABLE_FRACTION:
        raise ValueError(f"{len(bad)} of {len(records)} queries of {data_dir!r} have media that cannot be read "
                         f"(more than {MAX_UNREADABLE_FRACTION:.0%}), e.g. {bad[0]['skipped']}")


def own_counts(samples: Sequence[Sample], pool: Sequence[Sample]) -> list[int]:
    """Per sample, how many pool samples show its first media file (all 0: the splits are disjoint): demos it cannot
    draw, being itself (`DemoSelector.own`)."""
    by_media = Counter(s.media[0] for s in pool if s.media)
    return [by_media[s.media[0]] if s.media else 0 for s in samples]


def check_episodes(name: str, samples: Sequence[Sample], pool: Sequence[Sample], shots: Sequence[int],
                   zero_shot: str) -> None:
    """Refuse, before the first query, episodes (samples with `demo_ids`) that list fewer demos than the most shots
    asked take, or demo ids the train split lacks: found in the middle of the run, they would end it after every
    smaller shot count ran (MME's smallest subtasks allow 19 shots)."""
    episodes = [s for s in samples if s.demo_ids is not None]
    if not episodes:
        return
    most = max(shots)
    short = [s for s in episodes if len(s.demo_ids) < most * (s.ways or 1)]
    if short:
        s, allowed = short[0], min(len(e.demo_ids) // (e.ways or 1) for e in episodes)
        per = f" ({s.ways} demos a shot)" if s.ways else ""
        raise ValueError(f"{name}: {most} shots asked, but sample {s.id!r} lists {len(s.demo_ids)} demo_ids{per} "
                         f"({len(short)} of the {len(episodes)} episodes list too few): the data allows at most "
                         f"{allowed} shots")
    ids = {s.id for s in pool}
    text = ZERO_SHOT_TEXT_DEMOS if 0 in shots and zero_shot == "text" else 0
    for s in episodes:
        used = max(most * (s.ways or 1), min(text, len(s.demo_ids)))  # the demos any of its prompts shows
        if missing := [i for i in s.demo_ids[:used] if i not in ids]:
            raise ValueError(f"{name}: sample {s.id!r} lists demo_ids {missing[:5]} that the train split lacks")


def out_dir_problem(out_dir: Optional[str], task: str) -> Optional[str]:
    """Why `out_dir` cannot take `task`'s results (None: it can). A directory holds one task's evaluation: a re-run
    of that task replaces it (`write_results`), another task's results there (its results.json or prediction files)
    are refused rather than overwritten or mixed."""
    if out_dir is not None and not os.fspath(out_dir).strip():
        return f"out_dir {out_dir!r} names no directory (it would be the working directory): give a path"
    if out_dir is None or not os.path.exists(out_dir):
        return None
    if not os.path.isdir(out_dir):
        return f"out_dir {out_dir!r} is a file, not a directory"
    path = os.path.join(out_dir, RESULTS_FILE)
    others = set()
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                others.add(str(json.load(f)["task"]))
        except (OSError, ValueError, KeyError, TypeError):
            return f"{path!r} is not a results file of `flamingo eval`: remove it, or choose another out_dir"
    if os.path.isdir(predictions := os.path.join(out_dir, "predictions")):
        others |= {m.group(1) for f in os.listdir(predictions) if (m := PREDICTION_FILE.fullmatch(f))}
    if others - {task}:
        return (f"out_dir {out_dir!r} holds the results of {', '.join(sorted(others - {task}))}: choose another "
                f"out_dir for {task} (a directory holds one task's evaluation; a re-run of the same task replaces it)")
    return None


def summarize(runs: Sequence[dict[str, Any]], task_metrics: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Runs -> one row per (shots, metric): mean, std (population) and the per-trial values. `task_metrics` (the
    task's headline metrics) name the rows when no run computed any: every query skipped, each row `mean: None`."""
    rows = []
    metrics = list(dict.fromkeys(m for r in runs for m in r["metrics"])) or list(task_metrics)
    for k in dict.fromkeys(r["shots"] for r in runs):
        of_k = [r for r in runs if r["shots"] == k]
        for metric in metrics:
            # None: a breakdown key a trial's samples lack, or a trial whose queries were all skipped
            values = [r["metrics"].get(metric) for r in of_k]
            real = [v for v in values if v is not None]
            rows.append({"task": of_k[0]["task"], "model": of_k[0]["model"], "shots": k, "metric": metric,
                         "mean": float(np.mean(real)) if real else None,
                         "std": float(np.std(real)) if real else None,
                         "values": values, "seeds": [r["seed"] for r in of_k],
                         "num_samples": of_k[0]["num_samples"], "skipped": [r.get("skipped", 0) for r in of_k],
                         "date": of_k[0]["date"]})
    return rows


def markdown_table(results: dict[str, Any]) -> str:
    """A table with a row per metric and a column per number of shots: mean ± std over trials."""
    shots = list(dict.fromkeys(r["shots"] for r in results["runs"]))
    metrics = list(dict.fromkeys(r["metric"] for r in results["summary"]))
    cell = {(r["metric"], r["shots"]): r for r in results["summary"]}
    s = results["settings"]
    lines = [f"# {results['task']} — {results['model']}", "",
             f"{results['num_samples']} samples, {s['trials']} trial(s) "
             f"(seeds {s['seed']}..{s['seed'] + s['trials'] - 1}), "
             f"demos: {s['demos']}, zero-shot: {s['zero_shot']}, date: {results['date']}"
             + (f", CIDEr tokenizer: {results['tokenizer']}" if "tokenizer" in results else ""), "",
             "| metric | " + " | ".join(f"{k}-shot" for k in shots) + " |",
             "|---|" + "---|" * len(shots)]
    for m in metrics:
        row = []
        for k in shots:
            r = cell.get((m, k))
            if r is None or r["mean"] is None:
                row.append("n/a")
                continue
            values = r.get("values", ())  # a trial may leave a metric undefined (None)
            defined = sum(v is not None for v in values)
            row.append(f"{r['mean']:.2f} ± {r['std']:.2f}"
                       + (f" ({defined} of {len(values)} trials)" if defined < len(values) else ""))
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    for reason, why in SKIP_REASONS.items():
        skipped: dict[int, int] = {}
        for run in results["runs"]:
            n = run.get("skipped_by", {"too_long": run.get("skipped", 0)}).get(reason, 0)
            if n:
                skipped[run["shots"]] = max(skipped.get(run["shots"], 0), n)
        if skipped:
            lines += ["", f"Not run, {why} (of {results['num_samples']} queries, most over trials): "
                          + ", ".join(f"{k}-shot {n}" for k, n in skipped.items()) + "."]
    if results.get("unfinished"):
        lines += ["", "Unfinished (the evaluation stopped, or is still running): not yet run, "
                      + ", ".join(f"{r['shots']}-shot trial {r['trial']}" for r in results["unfinished"]) + "."]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: str) -> None:
    """Each headline metric vs number of shots (mean with std error bars), one panel per metric. Breakdowns
    (`metric/part`, e.g. VQA accuracy per answer type) are in the table and results.json only."""
    metrics = list(dict.fromkeys(r["metric"] for r in results["summary"]
                                 if "/" not in r["metric"] and r["mean"] is not None))
    if not metrics:  # every query of every run was skipped (longer than max_length): nothing to plot
        return
    fig = figure(figsize=(4.5 * len(metrics), 3.5))
    axes = fig.subplots(1, len(metrics), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        rows = [r for r in results["summary"] if r["metric"] == m and r["mean"] is not None]
        ax.errorbar([r["shots"] for r in rows], [r["mean"] for r in rows], yerr=[r["std"] for r in rows],
                    marker="o", capsize=3)
        ax.set_xticks([r["shots"] for r in rows])
        ax.set_xlabel("shots")
        ax.set_ylabel(m)
        ax.set_title(f"{results['task']}: {m}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


RESULTS_FILE = "results.json"  # in each out_dir: the dict `evaluate` returns
PREDICTION_FILE = re.compile(r"(.+)_(\d+)shot_trial(\d+)\.jsonl")  # predictions/{task}_{k}shot_trial{t}.jsonl


def write_results(results: dict[str, Any], predictions: dict[tuple[int, int], list[dict[str, Any]]],
                  out_dir: str, warn: bool = True, replace: bool = True) -> None:
    """`predictions` ({(shots, trial): records}) as predictions/{task}_{k}shot_trial{t}.jsonl, then results.json,
    results.md and results.png in `out_dir`, the plot last: without matplotlib it is skipped with a warning (`warn`),
    as training's plots are (`train.plots.plot_run`). `replace` (an evaluation's first write): an earlier evaluation
    of the task there is replaced, its prediction files (other shots or trials than this one's included) removed
    first, so every file in the directory belongs to this evaluation; its later writes pass only their new runs'
    predictions and leave the files written before (a prediction file is written once, not after every run)."""
    out = Path(out_dir)
    (out / "predictions").mkdir(parents=True, exist_ok=True)
    if replace:
        for old in (out / "predictions").iterdir():
            if (m := PREDICTION_FILE.fullmatch(old.name)) and m.group(1) == results["task"]:
                old.unlink()
    (out / "results.png").unlink(missing_ok=True)  # `plot` writes none when every query was skipped
    # each file whole or not at all (a run killed while writing leaves the previous one: a cut results.json would
    # make the same command refuse the directory)
    for (k, trial), records in predictions.items():
        name = out / "predictions" / f"{results['task']}_{k}shot_trial{trial}.jsonl"
        with atomic_file(str(name)) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
    with atomic_file(str(out / "results.md")) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(markdown_table(results))
    with atomic_file(str(out / RESULTS_FILE)) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    try:
        figure()  # whether matplotlib imports (the empty figure is dropped)
    except ImportError:
        if warn:  # once an evaluation: at its last write
            warnings.warn("matplotlib is not installed: no results.png (the numbers are in results.json and "
                          "results.md; pip install 'flamingo-vlm[eval]')", stacklevel=2)
        return
    plot(results, os.path.join(out, "results.png"))
