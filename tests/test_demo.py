"""`flamingo demo --size smoke`: every stage runs through the real pipeline and leaves its artefact, and the trained
Flamingo beats its gate-0 self on a held-out task. The smoke run takes a few minutes (two torchrun stages): its tests
are marked slow and distributed."""

from __future__ import annotations

import json
import os
import shlex

import pytest
import torch
import yaml

import flamingo_demo.demo as demo_module
from flamingo.build import load_pretrained
from flamingo.runtime import torchrun_command
from flamingo_demo.cli import build_parser
from flamingo_demo.demo import (
    config_path,
    eval_job,
    gate_zero_shots,
    per_rank_batches,
    run_demo,
    train_flamingo,
    train_overrides,
)
from flamingo_demo.evaluate import run_eval_job
from flamingo_demo.goals import generate_goal, goals, headline, skipped_queries, time_goal
from flamingo_demo.run import ABLATIONS, DemoRun, DemoSettings
from flamingo_demo.sizes import get_size
from flamingo_demo.tryit import HAND_PROMPTS

# (task, shots) on which training must have helped (the trained model vs its gate-0 self): captioning of held-out
# images, where the images visibly matter even after the smoke size's short run.
SMOKE_CHECK = ("captioning", 4)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo"))
    threads = torch.get_num_threads()
    try:
        return run_demo(DemoSettings(out=out, size="smoke", progress=False))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.distributed
def test_every_stage_leaves_its_artefact(demo_run):
    out = demo_run.settings.out
    world = demo_run.world
    for kind in ("pairs", "interleaved", "video", "multi"):
        assert os.path.isfile(world["data"][kind]["path"])
    for name in ("tokenizer", "vision", "lm"):
        assert os.path.isfile(os.path.join(demo_run.backbones[name]["dir"], "config.json")) or name == "tokenizer"
    final = demo_run.models["flamingo"]
    assert os.path.isfile(os.path.join(final, "flamingo_config.json"))
    assert os.path.isfile(os.path.join(out, "flamingo", "metrics.jsonl"))
    for variant in ("flamingo", "flamingo-gates0"):
        for task in demo_run.results[variant]:
            assert os.path.isfile(os.path.join(out, "eval", variant, task, "results.json"))
    report = open(os.path.join(out, "report.md")).read()
    assert demo_run.commands["flamingo"] in report  # the report gives the commands that reproduce the run
    lm = demo_run.backbones["lm"]  # the smoke size probes its LM's in-context recall, which never forms there
    assert (lm["steps"], lm["induction_step"], lm["max_steps"]) == (200, None, 200)
    # every hand-written prompt was answered, and the goals cover the hand prompts and the time
    assert [g["name"] for g in demo_run.generations] == [p.name for p in HAND_PROMPTS]
    for g in demo_run.generations:
        assert g["exit_code"] == 0 and all(os.path.isfile(p) for p in g["images"]) and g["command"] in report
    checked = goals(demo_run)
    assert generate_goal(demo_run) in checked and time_goal(demo_run) in checked
    assert all(ok in (True, False, None) for _, ok, _ in checked)
    for png in ("fewshot.png", "gates_flamingo.png", "loss_flamingo.png"):
        assert os.path.getsize(os.path.join(out, png)) > 1000
    stages = set(demo_run.times)
    assert {"world", "backbones", "train flamingo", "eval", "generate", "report"} <= stages
    assert demo_run.reused == []
    with open(os.path.join(out, "flamingo", "metrics.jsonl")) as f:
        first = json.loads(f.readline())
    assert set(first["gates"]) and {"loss/interleaved", "loss/pairs", "loss/video", "loss/multi"} <= set(first)
    # the multi-image questions, by reference and in words, at their own shots (3 images a sample)
    for task in ("multi_image", "multi_image_plain"):
        assert sorted({r["shots"] for r in demo_run.results["flamingo"][task]["runs"]}) == [0, 2, 4]
    with open(config_path()) as f:
        datasets = yaml.safe_load(f)["data"]
    # a step sees configs/mini.yaml's batches, whether one process or several (each with its share) trained
    assert first["samples"] == sum(d["batch_size"] for d in datasets)
    if demo_run.settings.train_procs > 1:
        config = os.path.abspath(config_path())
        launch = torchrun_command(demo_run.settings.train_procs, "flamingo.cli", ["train", config])
        assert demo_run.commands["flamingo"].startswith(shlex.join(launch) + " ")


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("ablation", sorted(ABLATIONS))
def test_each_ablation_trains_the_papers_variant(demo_run, ablation):
    """`--ablate X`'s Flamingo stage is configs/mini.yaml with the demo's overrides plus X's: the model it builds
    differs from the demo's in that one way (the paper's Table 3 rows), on the grown smoke backbones."""
    from flamingo.model.resampler import MLPResampler, PerceiverResampler
    from flamingo.train.config import load_config
    from flamingo.train.trainer import build_model

    base, _ = build_model(load_config(config_path(), train_overrides(demo_run, "flamingo")))
    layers = len(base.lm.get_submodule(base.decoder_layers_path))
    config = load_config(config_path(), train_overrides(demo_run, ablation))
    if ablation == "xattn-every-4" and layers < 4:  # the smoke LM has 2 layers: no block would be left
        with pytest.raises(ValueError, match="places no cross-attention block in this 2-layer LM"):
            build_model(config)
        with pytest.raises(ValueError, match="needs an LM of 4 layers or more"):  # refused before any stage runs
            run_demo(DemoSettings(out="/nonexistent/never-written", size="smoke", ablate=ablation))
        return
    model, _ = build_model(config)

    def trainable(m):
        return {n for n, p in m.named_parameters() if p.requires_grad}

    def gates(m):
        return {n for n, _ in m.named_parameters() if n.endswith("_gate")}

    assert base.xattn_layer_indices == list(range(layers)) and isinstance(base.resampler, PerceiverResampler)
    assert len(gates(base)) == 2 * layers and gates(base) <= trainable(base)
    if ablation == "gating":
        assert not gates(model) and trainable(base) - trainable(model) == gates(base)
    elif ablation == "xattn-every-4":
        assert len(model.xattn) == len(model.xattn_layer_indices) == layers // 4 < len(base.xattn)
    elif ablation == "mlp-resampler":
        assert isinstance(model.resampler, MLPResampler) and len(model.xattn) == len(base.xattn)
    elif ablation == "all-images":  # the same model; only the masking rule differs
        assert (base.config.only_attend_last_image, model.config.only_attend_last_image) == (True, False)
        assert trainable(model) == trainable(base)
    else:
        assert ablation == "unfrozen-lm"
        lm_params = {f"lm.{n}" for n, _ in model.lm.named_parameters()}
        assert lm_params <= trainable(model) and not lm_params <= trainable(base)
        assert not any(p.requires_grad for p in model.vision.parameters())


def test_processes_share_every_batch_or_are_refused():
    with open(config_path()) as f:
        datasets = yaml.safe_load(f)["data"]
    assert per_rank_batches(1) == []
    assert per_rank_batches(2) == [f"data.{i}.batch_size={d['batch_size'] // 2}" for i, d in enumerate(datasets)]
    with pytest.raises(ValueError, match="does not split over 5 processes"):
        per_rank_batches(5)
    with pytest.raises(ValueError, match="does not split over 5 processes"):  # refused before any stage runs
        run_demo(DemoSettings(out="/nonexistent/never-written", size="smoke", train_procs=5))


def test_a_negative_seed_is_refused_before_any_stage(tmp_path):
    with pytest.raises(ValueError, match="--seed must be >= 0"):
        run_demo(DemoSettings(out=str(tmp_path / "d"), size="smoke", seed=-1))
    assert not os.path.exists(tmp_path / "d")


@pytest.mark.slow
@pytest.mark.distributed
def test_trained_flamingo_beats_its_gate_zero_self(demo_run):
    task, shots = SMOKE_CHECK
    trained = headline(demo_run, "flamingo", task, shots)
    gates0 = headline(demo_run, "flamingo-gates0", task, shots)
    assert trained is not None and gates0 is not None
    assert trained > gates0, (task, shots, trained, gates0)


@pytest.mark.slow
@pytest.mark.distributed
def test_prompts_longer_than_the_lms_window_are_skipped_and_reported(demo_run):
    """The grown tokenizer carries the LM's context as model_max_length, so the harness skips (and the report counts)
    the smoke LM's 8-shot binding prompts (3 demos a shot of 2-3 nonsense words: far over its 128 positions)."""
    context = get_size("smoke").lm_context
    _, processor = load_pretrained(demo_run.models["flamingo"])
    assert processor.max_length == context == demo_run.backbones["lm"]["context"]
    binding = {r["shots"]: r["skipped"] for r in demo_run.results["flamingo"]["binding"]["runs"]}
    n = demo_run.results["flamingo"]["binding"]["num_samples"]
    assert binding[0] == 0 and binding[8] == n  # 0-shot prompts hold two text demos; 8 shots: 16-24 demos
    assert headline(demo_run, "flamingo", "binding", 8) is None
    assert f"flamingo binding 8-shot: {n} of {n}" in skipped_queries(demo_run)


@pytest.mark.slow
@pytest.mark.distributed
def test_evaluation_in_several_processes_equals_one_process(demo_run, tmp_path):
    """The demo's eval stage ran under torchrun (each process a strided share of the queries); the gate-0 job redone
    here in this one process gives the same predictions and metrics."""
    if demo_run.settings.eval_procs == 1:
        pytest.skip("this machine has one core: the demo evaluated in one process")
    job = eval_job(demo_run, "flamingo", demo_run.models["flamingo"], gates_zero=True,
                   shots=gate_zero_shots(demo_run.settings.shots))
    for task in job["tasks"]:
        task["out_dir"] = str(tmp_path / task["name"])
    threads = torch.get_num_threads()
    try:
        alone = run_eval_job(job)
    finally:
        torch.set_num_threads(threads)
    shared = demo_run.results["flamingo-gates0"]
    assert set(alone) == set(shared)
    for task in alone:
        assert [r["metrics"] for r in alone[task]["runs"]] == [r["metrics"] for r in shared[task]["runs"]], task
        for f in (tmp_path / task / "predictions").iterdir():
            other = os.path.join(demo_run.settings.out, "eval", "flamingo-gates0", task, "predictions", f.name)
            with open(other) as g:
                assert f.read_text() == g.read(), (task, f.name)


def test_a_flamingo_stage_stopped_by_a_signal_is_not_marked_done(tmp_path, monkeypatch):
    class StoppedTrainer:  # what Trainer.run does after SIGTERM: a checkpoint, no final model, returns ""
        stopped_by = 15

        def __init__(self, config):
            pass

        def run(self):
            return ""

    monkeypatch.setattr(demo_module, "Trainer", StoppedTrainer)
    run = DemoRun(DemoSettings(out=str(tmp_path), size="smoke", train_procs=1))
    kinds = ("interleaved", "pairs", "video", "prompted", "multi")
    run.world = {"data": {kind: {"path": f"{kind}.jsonl"} for kind in kinds}}
    run.backbones = {"vision": {"dir": "vision"}, "lm": {"dir": "lm"}}
    with pytest.raises(RuntimeError, match="stopped before its last step"):
        train_flamingo(run, "flamingo")
    assert not list(tmp_path.glob("flamingo/.done-*"))  # a rerun redoes the stage instead of reusing a missing model


def test_time_goal_is_judged_only_from_scratch_on_two_cores(tmp_path, monkeypatch):
    run = DemoRun(DemoSettings(out=str(tmp_path), size="binding"))
    run.times = {"world": 10.0, "backbones": 400.0, "train flamingo": 500.0, "eval": 90.0, "generate": 1.0,
                 "total": 1001.0}
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    goal, ok, numbers = time_goal(run)
    assert ok is False and "total 1001 s (world 10 s, backbones 400 s" in numbers and "`binding`" in goal
    run.times = {"world": 10.0, "total": 590.0}
    assert time_goal(run)[1] is True
    run.reused = ["world", "backbones"]  # an earlier run's stages: no from-scratch time
    goal, ok, numbers = time_goal(run)
    assert ok is None and "reused world, backbones" in numbers
    run.reused = []
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert time_goal(run)[1] is None


def test_the_main_command_runs_the_size_whose_lm_can_bind():
    """`flamingo demo` with no options (the README's command) grows the LM with induction documents, as does its
    Python default; `--size fast` is the one without them."""
    size = build_parser().parse_args([]).size
    assert size == DemoSettings(out="x").size
    main, fast = get_size(size), get_size("fast")
    assert main.copy_docs > 0 and main.assoc_docs > 0 and main.flamingo_gate_type == "vector"
    assert fast.copy_docs == fast.assoc_docs == 0


def test_multi_image_goals_weigh_each_question_type_and_compare_with_words(tmp_path):
    """One named image and two compared are judged apart (each type weighs the same), at the best shot count; the
    references must beat the plain prompt at every shot count."""
    from flamingo_demo.goals import multi_image_goals

    def results(rows: dict[int, dict[str, float]]) -> dict:
        return {"summary": [{"shots": k, "metric": m, "mean": v} for k, ms in rows.items() for m, v in ms.items()]}

    run = DemoRun(DemoSettings(out=str(tmp_path)))
    by_ref = {0: {"accuracy": 70.0, "accuracy/colour": 90.0, "accuracy/shape": 86.0, "accuracy/same_colour": 50.0,
                  "accuracy/same_shape": 50.0},
              4: {"accuracy": 75.0, "accuracy/colour": 100.0, "accuracy/shape": 90.0, "accuracy/same_colour": 60.0,
                  "accuracy/same_shape": 40.0}}
    run.results = {"flamingo": {"multi_image": results(by_ref),
                                "multi_image_plain": results({0: {"accuracy": 40.0}, 4: {"accuracy": 80.0}})}}
    one, two, words = multi_image_goals(run, [0, 2, 4])
    assert one[1] is True and one[2].startswith("4-shot 95.0% (colour 100.0%, shape 90.0%)")
    assert two[1] is False and two[2].startswith("0-shot 50.0%")
    assert words[1] is False and words[2] == "0-shot 70.0% vs 40.0%; 4-shot 75.0% vs 80.0%"
    run.results = {"flamingo": {}}
    assert multi_image_goals(run, [0, 2, 4]) == []


def test_the_reports_reproduce_command_parses_back_to_the_runs_settings():
    """`--shots` other than the default is part of the command, and the output path is shell-quoted."""
    from flamingo_demo.report import reproduce_command

    settings = DemoSettings(out="/tmp/my demo's run", size="smoke", seed=3, shots=(0, 4), train_procs=1, eval_procs=2)
    words = shlex.split(reproduce_command(DemoRun(settings)))
    assert words[:2] == ["flamingo", "demo"]
    args = build_parser().parse_args(words[2:])
    assert (args.out, args.size, args.seed, args.shots, args.train_procs, args.eval_procs) == \
        (settings.out, "smoke", 3, [0, 4], 1, 2)
    assert "--shots" not in reproduce_command(DemoRun(DemoSettings(out="o")))


def test_the_generate_stage_prints_what_flamingo_generate_prints(monkeypatch):
    """Decoded by the processor as the CLI does: a generated reference token `<imageK>` stays in the answer."""
    from flamingo.tiny import tiny_flamingo
    from flamingo_demo.tryit import generate_text

    model, processor = tiny_flamingo(num_image_references=3)
    tok = processor.tokenizer
    prompt_ids = processor("Look:")["input_ids"]
    answer = tok.encode(" green", add_special_tokens=False) + [tok.convert_tokens_to_ids("<image2>")] + \
        tok.encode(" is", add_special_tokens=False) + [tok.convert_tokens_to_ids("<|endofchunk|>")]
    monkeypatch.setattr(model, "generate", lambda **kw: torch.cat([prompt_ids, torch.tensor([answer])], 1))
    printed = generate_text(model, processor, "Look:", [], max_new_tokens=4)
    assert printed == processor.decode(answer).strip() and "<image2>" in printed and "endofchunk" not in printed
