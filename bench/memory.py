"""Memory per training recipe and per inference storage: ours vs the OpenFlamingo peer on the same weights.

    python -m bench.memory --shape cpu                          # 2 CPU cores: one subprocess per row
    python -m bench.memory --shape gpu --device cuda            # torch.cuda.max_memory_allocated
    python -m bench.memory --shape tiny --device cpu --in-process --repeats 1   # smoke run (no goal is meaningful)

Training rows (one AdamW step, batch x tokens with images, `bench.train`'s batch): OpenFlamingo's default recipe
(fp32 weights, bf16 autocast on CUDA, torch AdamW over its trained parameters) beside ours with the frozen backbones
in fp32, bf16, int8, int4 (CUDA) or nf4, with 8-bit AdamW states, activation checkpointing, LoRA on the LM, and the
optimizer stepping inside backward (`inbwd`: no global-norm clip there, the others clip at 1). Our rows compute the loss
as the trainer does by default, the logits made in 8 chunks of the tokens (`train.loss_chunks`); `whole_logits` from
the whole logits. Per row: bytes of frozen and trained weights, optimizer states, gradients, and the step's peak memory.
- CUDA: `torch.cuda.max_memory_allocated` over the measured steps (every tensor on the device).
- CPU: the timeline of torch's memory profiler over one step (`torch.profiler`, `profile_memory`): every tensor the
  CPU allocator hands out and takes back, and the tensors alive before the step that its ops read; its highest total,
  plus the weights and states it did not see at its start (`unseen_mib`: torchao's 8-bit states, read only inside
  their compiled update). Tensor bytes, like CUDA's figure, not the resident set (which the allocator's reuse of
  freed pages blurs: a step's gradients reuse the pages the previous step's freed).
On CUDA every row of ours computes under bf16 autocast with the non-quantized frozen weights in bf16 (as `bench.train`
and the trainer's `frozen_dtype: bf16`); on the CPU in fp32 (quantized rows too), except the bf16 row.

Inference rows (fp32, fp16, bf16, int8, int4, nf4): the model's weight bytes (vs fp16), greedy decode tokens/s with
one image, and the quality check: mean |logits - fp32 logits| over fixed prompts with images (and / std of fp32
logits). With a demo model (`--demo-model`, default /work/demo-scratch's), its VQA accuracy per quantized mode.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import subprocess
import sys
import time
from typing import Any, Callable, Optional

import torch

from bench.common import build_pair, machine, parse_args, print_json, print_table, timed_steps
from bench.train import make_batch
from flamingo.model.quantize import (
    QuantizationUnavailable,
    cast_frozen,
    check_available,
    module_bytes,
    quantize_frozen,
    tensor_bytes,
)
from flamingo.train.config import TrainSection
from flamingo.train.in_backward import BackwardSteps

TRAIN_ROWS: dict[str, dict[str, Any]] = {  # frozen storage, optimizer, checkpointing, LoRA
    "fp32": dict(frozen="fp32"),
    "bf16_frozen": dict(frozen="bf16"),
    "int8_frozen": dict(frozen="int8"),
    "int4_frozen": dict(frozen="int4"),
    "nf4_frozen": dict(frozen="nf4"),
    "adamw8bit": dict(frozen="bf16", optim="adamw8bit"),
    "checkpointing": dict(frozen="bf16", checkpointing=True),
    "lora": dict(frozen="bf16", lora=True),  # LORA: r 16 on the attention's q and v projections
    # the loss from the whole (B, T, V) logits, not the trainer's default chunks (model/chunked_loss.py)
    "whole_logits": dict(frozen="bf16", loss_chunks=0),
    "int8+adamw8bit": dict(frozen="int8", optim="adamw8bit"),
    "int8+adamw8bit+ckpt": dict(frozen="int8", optim="adamw8bit", checkpointing=True),
    # optim.in_backward (flamingo/train/in_backward.py): each parameter steps inside backward, its gradient freed
    "int8+adamw8bit+inbwd": dict(frozen="int8", optim="adamw8bit", in_backward=True),
    "int8+adamw8bit+ckpt+inbwd": dict(frozen="int8", optim="adamw8bit", checkpointing=True, in_backward=True),
}
LORA = {"r": 16, "target_modules": ["q_proj", "v_proj"]}
INFER_ROWS = ("fp32", "fp16", "bf16", "int8", "int4", "nf4")
DEMO_MODES = ("none", "int8", "int4", "nf4")
DEMO_DIRS = ("/work/demo-scratch/flamingo/final", "/work/demo-scratch/world/eval/vqa")
PROMPTS = ["<image>Question: what colour is the shape? Short answer:",
           "<image>A photo of<|endofchunk|><image>A picture of two",
           "Question: what is the capital of France? Answer: Paris. <image>Question: and here? Answer:"]


# ------------------------------------------------------------------------------------------------------ memory
def peak_during(fn: Callable[[], Any], device: str) -> tuple[float, float]:
    """Bytes of tensor memory during `fn`: (peak, at its start). CUDA: the allocator's max allocated and allocated.
    CPU: the timeline of torch's memory profiler (every tensor the CPU allocator hands out and takes back, and the
    tensors alive before `fn` that its ops touch): its highest total and its first."""
    gc.collect()  # a Flamingo is a reference cycle (its hooks hold it): an earlier row's copy is freed only here
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated()), float(start)
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")  # bytes per category per event
    totals = [sum(row) for row in sizes]
    return (float(max(totals)), float(totals[0])) if totals else (0.0, 0.0)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(tensor_bytes(v) for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))


# ------------------------------------------------------------------------------------------------------ training
def _lora(model: torch.nn.Module) -> None:
    """LoRA adapters (r 16 on q_proj and v_proj, flamingo/model/lora.py) on the copy's frozen LM."""
    from flamingo.model.lora import apply_lora

    apply_lora(model.lm, LORA)


def _optimizer(model: torch.nn.Module, kind: str, fused: bool) -> torch.optim.Optimizer:
    from flamingo.train.optim import make_optimizer

    return make_optimizer(model, 1e-4, 0.1, (0.9, 0.999), 1e-8, fused=fused and kind == "adamw", kind=kind)


def prepare_ours(master: torch.nn.Module, spec: dict[str, Any], device: str) -> torch.nn.Module:
    """A copy of our model stored as `spec` says, on `device`."""
    model = copy.deepcopy(master)
    if spec.get("lora"):  # before the cast, as the trainer builds them (from the config): the adapters train in fp32
        _lora(model)
    frozen = spec.get("frozen", "fp32")
    low = torch.bfloat16 if (frozen == "bf16" or (device.startswith("cuda") and frozen != "fp32")) else None
    if low is not None:
        cast_frozen(model, low)
    model.to(device)
    if frozen in ("int8", "int4", "nf4"):
        quantize_frozen(model, frozen)
    if spec.get("checkpointing"):
        model.gradient_checkpointing_enable()
    return model.train()


def train_row(name: str, pair: Any, batch: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    dev, cuda = args.device, args.device.startswith("cuda")
    spec = TRAIN_ROWS.get(name, {})
    if name == "openflamingo":
        model = pair.peer.to(dev).train()
        trained = [p for p in model.parameters() if p.requires_grad]
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(trained, lr=1e-4)
        bf16 = cuda

        def loss() -> torch.Tensor:
            return model(vision_x=batch["images"], lang_x=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"]).loss
    else:
        if spec["frozen"] in ("int4", "int8", "nf4"):
            check_available(spec["frozen"], dev)
        model = prepare_ours(pair.ours, spec, dev)
        trained = [p for p in model.parameters() if p.requires_grad]
        optimizer = _optimizer(model, spec.get("optim", "adamw"), fused=cuda)
        bf16 = cuda or spec["frozen"] == "bf16"

        chunks = spec.get("loss_chunks", TrainSection.loss_chunks)

        def loss() -> torch.Tensor:
            return model(**batch, check_media=False, loss_chunks=chunks).loss

    autocast = torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=bf16)
    in_backward = BackwardSteps(trained, optimizer) if spec.get("in_backward") else None

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            value = loss()
        if in_backward is not None:
            in_backward.begin()
            value.backward()  # the optimizer steps in its hooks
            return
        value.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()

    for _ in range(2):  # warm-up: optimizer states exist, compiled kernels (8-bit states) are built
        step()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.repeats):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.repeats
    peaks = []
    for _ in range(args.repeats):  # the previous step's gradients freed first, as the step itself would: what is
        optimizer.zero_grad(set_to_none=True)  # alive at the start is then the weights and states alone
        peaks.append(peak_during(step, dev))
    peak, at_start = max(peaks)
    row = {"row": name, "frozen_mib": module_bytes(model, trained=False) / 2**20,
           "trained_mib": module_bytes(model, trained=True) / 2**20, "optim_mib": state_bytes(optimizer) / 2**20,
           "grads_mib": sum(tensor_bytes(p.grad) for p in trained if p.grad is not None) / 2**20,
           "step_s": seconds}
    if not cuda:  # weights and states the profiler's timeline did not see at its start (tensors no op of the step
        # reads directly: torchao's 8-bit states live inside its compiled update) are alive throughout: added
        held = (row["frozen_mib"] + row["trained_mib"] + row["optim_mib"]) * 2**20
        row["unseen_mib"] = max(0.0, held - at_start) / 2**20
        peak += row["unseen_mib"] * 2**20
    row["peak_gib"] = peak / 2**30
    if name == "openflamingo":
        pair.peer.to("cpu")
    return row


# ------------------------------------------------------------------------------------------------------ inference
def prepare_infer(master: torch.nn.Module, mode: str, device: str) -> torch.nn.Module:
    model = copy.deepcopy(master)
    if mode in ("fp16", "bf16"):
        model.to(torch.float16 if mode == "fp16" else torch.bfloat16)
    elif mode != "fp32" and device.startswith("cuda"):
        model.to(torch.bfloat16)  # quantized backbones beside bf16 weights: the usual GPU inference recipe
    model.to(device)
    if mode in ("int8", "int4", "nf4"):
        check_available(mode, device)
        quantize_frozen(model, mode)
    return model.eval()


@torch.no_grad()
def infer_row(mode: str, pair: Any, reference: Optional[torch.Tensor], args: argparse.Namespace
              ) -> tuple[dict[str, Any], torch.Tensor]:
    dev = args.device
    model = prepare_infer(pair.ours, mode, dev)
    dtype = next(p for p in model.resampler.parameters()).dtype
    prompts = pair.processor(PROMPTS, images=_images(pair, [1, 2, 1]))
    inputs = {k: v.to(dev) for k, v in prompts.items() if v is not None}
    inputs["images"] = inputs["images"].to(dtype)
    logits = model(**inputs).logits.float()  # (B, T, V)
    real = inputs["attention_mask"].bool()
    row: dict[str, Any] = {"row": mode, "weights_mib": module_bytes(model) / 2**20,
                           "backbones_mib": (module_bytes(model.vision) + module_bytes(model.lm)) / 2**20}
    if reference is not None:
        diff = (logits - reference).abs()[real]  # (tokens, V)
        row["logit_mad"] = float(diff.mean())
        row["logit_mad_rel"] = float(diff.mean() / reference[real].std())
    one = pair.processor(PROMPTS[0], images=_images(pair, [1])[0])
    one = {k: v.to(dev) for k, v in one.items() if v is not None}
    one["images"] = one["images"].to(dtype)
    n = args.decode_tokens
    _, step_s = timed_steps(lambda clock: model.generate(**one, max_new_tokens=n, min_new_tokens=n, streamer=clock),
                            dev, args.repeats)
    row["decode_tok_s"] = 1.0 / step_s
    return row, logits


def _images(pair: Any, counts: list[int]) -> list[list[Any]]:
    """Reproducible noise images: `counts[i]` of them for prompt i."""
    from flamingo.tiny import random_image

    seeds = iter(range(sum(counts)))
    return [[random_image(next(seeds), pair.image_size) for _ in range(c)] for c in counts]


# ------------------------------------------------------------------------------------------------------ demo VQA
def demo_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The demo model's VQA accuracy (shots 0 and 4, mean) per quantized mode; [] when no demo model is here."""
    model_dir, data_dir = args.demo_model, args.demo_vqa
    if not (model_dir and data_dir and os.path.isdir(model_dir) and os.path.isdir(data_dir)):
        return []
    from flamingo.build import load_pretrained
    from flamingo.eval.runner import evaluate

    rows = []
    for mode in DEMO_MODES:
        try:
            check_available(mode, args.device)
        except QuantizationUnavailable as e:
            rows.append({"row": f"demo vqa {mode}", "note": str(e).split(":")[0]})
            continue
        model, processor = load_pretrained(model_dir, device=args.device, quantize_frozen=mode)
        results = evaluate(model, processor, "vqa", data_dir, shots=(0, 4), trials=1,
                           num_samples=args.demo_samples, batch_size=16, progress=False)
        accuracies = [run["metrics"]["vqa_accuracy"] for run in results["runs"]]
        rows.append({"row": f"demo vqa {mode}", "vqa_accuracy": sum(accuracies) / len(accuracies)})
    return rows


# ------------------------------------------------------------------------------------------------------ goals
def goals(train: list[dict[str, Any]], infer: list[dict[str, Any]], demo: list[dict[str, Any]]
          ) -> list[dict[str, Any]]:
    """Issue #35's goals the rows can speak to: (goal, measured, target, reached); lower is better for all but VQA."""
    by_train = {r["row"]: r for r in train if "peak_gib" in r}
    by_infer = {r["row"]: r for r in infer if "weights_mib" in r}
    by_demo = {r["row"]: r for r in demo if "vqa_accuracy" in r}
    out = []

    def add(goal: str, measured: Optional[float], target: float) -> None:
        out.append({"goal": goal, "measured": measured, "target": target,
                    "reached": None if measured is None else measured <= target})

    peer, best = by_train.get("openflamingo"), by_train.get("int8+adamw8bit")
    add("train peak, int8 frozen + 8-bit states, vs OpenFlamingo",
        best["peak_gib"] / peer["peak_gib"] if peer and best else None, 0.4)
    for suffix, says in (("+ckpt", "with activation checkpointing"), ("+inbwd", "stepping inside backward"),
                         ("+ckpt+inbwd", "with both")):
        row = by_train.get("int8+adamw8bit" + suffix)
        add(f"(the same, {says})", row["peak_gib"] / peer["peak_gib"] if peer and row else None, 0.4)
    fp16, int4 = by_infer.get("fp16"), by_infer.get("int4")
    add("inference weights, int4 vs fp16", int4["weights_mib"] / fp16["weights_mib"] if fp16 and int4 else None, 0.35)
    add("(the same, frozen backbones only)", int4["backbones_mib"] / fp16["backbones_mib"] if fp16 and int4 else None,
        0.35)
    fp32, int8 = by_demo.get("demo vqa none"), by_demo.get("demo vqa int8")
    add("demo VQA points lost, int8 vs fp32",
        fp32["vqa_accuracy"] - int8["vqa_accuracy"] if fp32 and int8 else None, 2.0)
    return out


# ------------------------------------------------------------------------------------------------------ driver
def run_rows(args: argparse.Namespace, kind: str, names: list[str]) -> list[dict[str, Any]]:
    """`kind` rows in this process (one shared pair, built only when a row asks for it)."""
    if not names:
        return []
    pair = build_pair(args.shape, xattn_every=args.xattn_every)  # on the CPU, fp32; copies go to the device per row
    rows: list[dict[str, Any]] = []
    if kind == "train":
        batch = make_batch(pair.processor, args.batch, args.tokens, args.images, pair.image_size, args.device)
        for name in names:
            rows.append(_guarded(name, lambda: train_row(name, pair, batch, args)))
            print_json("memory.row", rows[-1])  # as it comes: a run cut short keeps its rows
    else:
        reference = None
        for name in names:
            row = _guarded(name, lambda: infer_row(name, pair, reference, args))
            if isinstance(row, tuple):
                row, logits = row
                reference = logits if name == "fp32" else reference
            rows.append(row)
            print_json("memory.row", row)
    return rows


def _guarded(name: str, fn: Callable[[], Any]) -> Any:
    """A row that cannot run here says why (a mode without a kernel on this device, a missing module)."""
    try:
        return fn()
    except (QuantizationUnavailable, ImportError, NotImplementedError, RuntimeError, ValueError) as e:
        if isinstance(e, RuntimeError) and "out of memory" in str(e):
            raise
        return {"row": name, "note": f"not run: {type(e).__name__}: {str(e)[:90]}"}


def run_subprocess(args: argparse.Namespace, kind: str, name: str) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.memory", "--shape", args.shape, "--device", args.device, "--batch",
               str(args.batch), "--tokens", str(args.tokens), "--images", str(args.images), "--repeats",
               str(args.repeats), "--decode-tokens", str(args.decode_tokens), "--xattn-every", str(args.xattn_every),
               f"--only-{kind}", name]
    out = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not lines:
        return {"row": name, "note": f"failed: {out.stderr.strip().splitlines()[-1:]}"}
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="cpu", choices=["tiny", "cpu", "gpu"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="default: 8 on CUDA, 2 on the CPU")
    parser.add_argument("--tokens", type=int, default=None, help="default: 256 on CUDA, 128 on the CPU")
    parser.add_argument("--images", type=int, default=5)
    parser.add_argument("--xattn-every", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--train-rows", default=",".join(["openflamingo", *TRAIN_ROWS]))
    parser.add_argument("--infer-rows", default=",".join(INFER_ROWS))
    parser.add_argument("--in-process", action="store_true", help="CPU: every row in this process (faster, rougher)")
    parser.add_argument("--demo-model", default=DEMO_DIRS[0], help="a trained demo model ('' to skip)")
    parser.add_argument("--demo-vqa", default=DEMO_DIRS[1], help="its VQA evaluation set")
    parser.add_argument("--demo-samples", type=int, default=80)
    parser.add_argument("--only-train", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--only-infer", default=None, help=argparse.SUPPRESS)
    args = parse_args(parser)
    cuda = args.device.startswith("cuda")
    args.batch = args.batch or (8 if cuda else 2)
    args.tokens = args.tokens or (256 if cuda else 128)
    if args.only_train or args.only_infer:  # a child: one row, one JSON line
        kind, name = ("train", args.only_train) if args.only_train else ("infer", args.only_infer)
        names = [name] if kind == "train" or name == "fp32" else ["fp32", name]  # quality needs fp32 logits
        print(json.dumps(run_rows(args, kind, names)[-1]))
        return

    print(f"# bench.memory on {machine()}, shape={args.shape}, batch={args.batch}, tokens={args.tokens}, "
          f"images={args.images}")
    started = time.perf_counter()
    train_names = [n for n in args.train_rows.split(",") if n]
    infer_names = [n for n in args.infer_rows.split(",") if n]
    if cuda or args.in_process:
        train = run_rows(args, "train", train_names)
        infer = run_rows(args, "infer", infer_names)
    else:
        train = [run_subprocess(args, "train", n) for n in train_names]
        infer = [run_subprocess(args, "infer", n) for n in infer_names]
    peer = next((r for r in train if r["row"] == "openflamingo" and "peak_gib" in r), None)
    for r in train:
        if peer and "peak_gib" in r:
            r["peak_vs_openflamingo"] = r["peak_gib"] / peer["peak_gib"]
    fp16 = next((r for r in infer if r["row"] == "fp16" and "weights_mib" in r), None)
    for r in infer:
        if fp16 and "weights_mib" in r:
            r["weights_vs_fp16"] = r["weights_mib"] / fp16["weights_mib"]
            r["backbones_vs_fp16"] = r["backbones_mib"] / fp16["backbones_mib"]
    demo = demo_rows(args)

    print("\n## training step")
    print_table(train, ["row", "frozen_mib", "trained_mib", "optim_mib", "grads_mib", "unseen_mib", "peak_gib",
                        "peak_vs_openflamingo", "step_s", "note"])
    print("\n## inference")
    print_table(infer, ["row", "weights_mib", "weights_vs_fp16", "backbones_mib", "backbones_vs_fp16", "decode_tok_s",
                        "logit_mad", "logit_mad_rel", "note"])
    if demo:
        print("\n## demo VQA (shots 0 and 4, mean)")
        print_table(demo, ["row", "vqa_accuracy", "note"])
    else:
        print(f"\n(demo VQA not run: no demo model at {args.demo_model!r})")
    table = goals(train, infer, demo)
    print("\n## goals of issue #35")
    print_table(table, ["goal", "measured", "target", "reached"])
    print_json("memory", {"shape": args.shape, "device": machine(), "batch": args.batch, "tokens": args.tokens,
                          "images": args.images, "torch": torch.__version__, "train": train, "infer": infer,
                          "demo": demo, "goals": table, "seconds": time.perf_counter() - started})


if __name__ == "__main__":
    main()
