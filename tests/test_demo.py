"""`flamingo demo --size smoke`: every stage runs through the real pipeline and leaves its artefact, and the trained
Flamingo beats its gate-0 self on a held-out task."""

from __future__ import annotations

import json
import os

import pytest
import torch

from flamingo.mini.demo import SMOKE_CHECK, DemoSettings, run_demo
from flamingo.mini.report import headline


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo"))
    threads = torch.get_num_threads()
    try:
        return run_demo(DemoSettings(out=out, size="smoke", progress=False))
    finally:
        torch.set_num_threads(threads)


def test_every_stage_leaves_its_artefact(demo_run):
    out = demo_run.settings.out
    world = demo_run.world
    for kind in ("pairs", "interleaved", "video"):
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
    for section in ("## Few-shot results", "vqa by question type", "| colour |", "## Goals", "## Training",
                    "## Wall time per stage", "flamingo train"):
        assert section in report
    for png in ("fewshot.png", "gates_flamingo.png", "loss_flamingo.png"):
        assert os.path.getsize(os.path.join(out, png)) > 1000
    stages = set(demo_run.times)
    assert {"world", "backbones", "train flamingo", "eval flamingo", "report"} <= stages
    with open(os.path.join(out, "flamingo", "metrics.jsonl")) as f:
        first = json.loads(f.readline())
    assert set(first["gates"]) and {"loss/interleaved", "loss/pairs", "loss/video"} <= set(first)


def test_trained_flamingo_beats_its_gate_zero_self(demo_run):
    task, shots = SMOKE_CHECK
    trained = headline(demo_run, "flamingo", task, shots)
    gates0 = headline(demo_run, "flamingo-gates0", task, shots)
    assert trained is not None and gates0 is not None
    assert trained > gates0, (task, shots, trained, gates0)
