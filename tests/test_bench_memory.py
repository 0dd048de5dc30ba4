"""bench/memory.py's measurements: the CPU peak sees a step's allocations, quantized rows hold fewer frozen bytes and
stay close to fp32, and the goals table judges each goal in its direction."""

import argparse

import pytest
import torch

pytest.importorskip("torchao")

from bench.common import build_pair  # noqa: E402
from bench.memory import TRAIN_ROWS, goals, peak_during, prepare_ours, run_rows  # noqa: E402


def _args(**overrides):
    base = dict(shape="tiny", device="cpu", batch=1, tokens=48, images=2, repeats=1, decode_tokens=3,
                xattn_every=1)
    return argparse.Namespace(**{**base, **overrides})


def test_cpu_peak_is_the_most_tensor_memory_alive_at_once():
    held = torch.ones(2**20)  # 4 MiB alive before the step and read by it

    def step():
        a = torch.ones(4 * 2**20)  # 16 MiB
        b = a + held.sum()  # 16 MiB more: 32 MiB of the step's own alive here
        del a
        c = b * 2  # b and c: 32 MiB again
        del b, c

    peak, start = peak_during(step, "cpu")
    assert start == 4 * 2**20 and peak - start == pytest.approx(32 * 2**20, abs=2**12)
    assert peak_during(lambda: None, "cpu") == (0.0, 0.0)


def test_rows_at_the_tiny_shape(one_thread):
    train = {r["row"]: r for r in run_rows(_args(), "train", ["openflamingo", "fp32", "int8_frozen", "int4_frozen"])}
    assert train["int8_frozen"]["frozen_mib"] < train["fp32"]["frozen_mib"]
    assert train["int8_frozen"]["trained_mib"] == train["fp32"]["trained_mib"]
    assert train["fp32"]["optim_mib"] == pytest.approx(2 * train["fp32"]["trained_mib"], rel=1e-3)  # 2 fp32 moments
    assert all(r["peak_gib"] > 0 for r in train.values() if "note" not in r)
    assert "not run" in train["int4_frozen"]["note"]  # no int4 kernel on the CPU: said, not crashed

    infer = {r["row"]: r for r in run_rows(_args(), "infer", ["fp32", "fp16", "int8"])}
    assert infer["fp16"]["weights_mib"] == pytest.approx(infer["fp32"]["weights_mib"] / 2, rel=1e-3)
    assert infer["int8"]["backbones_mib"] < infer["fp32"]["backbones_mib"]
    assert 0 < infer["int8"]["logit_mad_rel"] < 0.01 and infer["int8"]["decode_tok_s"] > 0


def test_the_lora_row_trains_float32_adapters_over_a_bf16_lm_as_the_trainer_does(one_thread):
    """The row added the adapters after casting the LM to bf16, so PEFT made them (and AdamW their states) bf16."""
    model = prepare_ours(build_pair("tiny").ours, TRAIN_ROWS["lora"], "cpu")
    adapters = {p.dtype for n, p in model.lm.named_parameters() if ".lora_" in n}
    assert adapters == {torch.float32}
    assert {p.dtype for p in model.lm.parameters() if not p.requires_grad} == {torch.bfloat16}


@pytest.mark.slow
def test_stepping_inside_backward_leaves_no_gradients_and_the_same_states(one_thread):
    train = {r["row"]: r for r in run_rows(_args(), "train", ["int8+adamw8bit", "int8+adamw8bit+inbwd"])}
    after, inside = train["int8+adamw8bit"], train["int8+adamw8bit+inbwd"]
    assert after["grads_mib"] == pytest.approx(after["trained_mib"], rel=1e-3) and inside["grads_mib"] == 0
    assert inside["optim_mib"] == after["optim_mib"] and inside["peak_gib"] > 0


def test_goals_direction_and_missing_rows():
    train = [{"row": "openflamingo", "peak_gib": 10.0}, {"row": "int8+adamw8bit", "peak_gib": 3.9}]
    infer = [{"row": "fp16", "weights_mib": 100.0, "backbones_mib": 80.0},
             {"row": "int4", "weights_mib": 40.0, "backbones_mib": 24.0}]
    demo = [{"row": "demo vqa none", "vqa_accuracy": 90.0}, {"row": "demo vqa int8", "vqa_accuracy": 87.5}]
    table = {r["goal"]: r for r in goals(train, infer, demo)}
    assert [r["reached"] for r in table.values()] == [True, None, None, None, False, True, False]
    assert table["demo VQA points lost, int8 vs fp32"]["measured"] == 2.5
    assert all(r["measured"] is None and r["reached"] is None for r in goals([], [], []))
