"""Shared benchmark set-up: our model and the OpenFlamingo peer on the same random backbones and the same weights.

Shapes (random weights, nothing downloaded):
- `cpu`: Llama hidden 512 x 8 layers (vocab 32000), CLIP-shaped tower 256 wide x 4 layers at 64 px, xattn every layer.
- `gpu`: a ~1.3B Llama-shaped LM (hidden 2048, 24 layers, vocab 32000) + a ViT-L/14-shaped CLIP tower at 224 px.
- `tiny`: the test-suite backbones (hidden 32), for a smoke run of the bench scripts.
`lm="mosaic_gpt"` puts MosaicGPT (OpenFlamingo-3B's LM family: biases, QK LayerNorm, ALiBi, a 4x GELU MLP) of the
same width, depth and heads in the Llama's place; at the `gpu` shape that is MPT-1B's shape (2048 x 24, 16 heads).
`peer="v1"` builds OpenFlamingo v1 (0.0.2) instead of 2.0.1 and converts it with v1's rule; `peer="mmgpt"`
Multimodal-GPT (v1 + PEFT LoRA on its LM and blocks, random non-zero adapters), converted twice: the LM's adapters
kept (`ours`) and merged (`ours_merged`).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from flamingo import Flamingo, FlamingoProcessor
from flamingo.convert import convert_mmgpt, convert_openflamingo
from flamingo.model.mosaic_gpt import MosaicGPTConfig, MosaicGPTForCausalLM
from flamingo.peers.mmgpt import LORA_CONFIG, apply_mmgpt_lora, load_mmgpt_modules
from flamingo.peers.openflamingo import build_openflamingo
from flamingo.runtime.device import check_device
from flamingo.runtime.json_values import json_safe
from flamingo.tiny import tiny_image_processor, tiny_tokenizer

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(lm=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2), vision=dict(hidden_size=32, intermediate_size=64,
                                                             num_hidden_layers=2, num_attention_heads=4,
                                                             image_size=32, patch_size=8), vocab=300),
    "cpu": dict(lm=dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                        num_key_value_heads=8), vision=dict(hidden_size=256, intermediate_size=1024,
                                                            num_hidden_layers=4, num_attention_heads=4,
                                                            image_size=64, patch_size=8), vocab=32000),
    "gpu": dict(lm=dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
                        num_key_value_heads=16), vision=dict(hidden_size=1024, intermediate_size=4096,
                                                             num_hidden_layers=24, num_attention_heads=16,
                                                             image_size=224, patch_size=14), vocab=32000),
}


@dataclass
class Pair:
    ours: Flamingo
    peer: torch.nn.Module  # OpenFlamingo's Flamingo
    bare_lm: torch.nn.Module  # the same LM weights with no Flamingo attached
    processor: FlamingoProcessor
    image_size: int
    peer_name: str = "openflamingo"  # which of PEERS `peer` is
    ours_merged: Optional[Flamingo] = None  # mmgpt: ours with the LM's LoRA adapters merged into its weights


LM_FAMILIES = ("llama", "mosaic_gpt")
PEERS = ("openflamingo", "v1", "mmgpt")  # OpenFlamingo 2.0.1, OpenFlamingo v1 (0.0.2), Multimodal-GPT (0.0.1)


def random_lm(family: str, spec: dict[str, Any], vocab: int) -> torch.nn.Module:
    """A random LM of the shape's width, depth and heads: Llama, or MosaicGPT (biases and QK LayerNorm on)."""
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, bos_token_id=0, eos_token_id=0, **spec)).eval()
    if family == "mosaic_gpt":
        config = MosaicGPTConfig(d_model=spec["hidden_size"], n_heads=spec["num_attention_heads"],
                                 n_layers=spec["num_hidden_layers"], vocab_size=vocab, max_seq_len=2048,
                                 attn_qk_ln=True, bos_token_id=0, eos_token_id=0)
        return MosaicGPTForCausalLM(config).eval()
    raise ValueError(f"unknown LM family {family!r}; choose from {LM_FAMILIES}")


def build_pair(shape: str, *, xattn_every: int = 1, device: str = "cpu", dtype: torch.dtype = torch.float32,
               gate: float = 0.3, seed: int = 0, lm: str = "llama", peer: str = "openflamingo") -> Pair:
    """The peer (one of PEERS) built on the backbones, gates set non-zero, then converted into ours: same weights."""
    spec = SHAPES[shape]
    torch.manual_seed(seed)
    tok = tiny_tokenizer(pad_vocab_to=spec["vocab"]) if spec["vocab"] > 300 else tiny_tokenizer()
    lm = random_lm(lm, spec["lm"], len(tok))
    vision = CLIPVisionModel(CLIPVisionConfig(**spec["vision"])).eval()
    image_processor = tiny_image_processor("clip", spec["vision"]["image_size"])

    if peer not in PEERS:
        raise ValueError(f"unknown peer {peer!r}; choose from {PEERS}")
    peer_name = peer
    peer, peer_tok = build_openflamingo(copy.deepcopy(vision), copy.deepcopy(lm), copy.deepcopy(tok),
                                        cross_attn_every_n_layers=xattn_every, v1=peer_name != "openflamingo",
                                        modules=load_mmgpt_modules() if peer_name == "mmgpt" else None)
    with torch.no_grad():
        for layer in peer.lang_encoder.gated_cross_attn_layers:
            if layer is not None:
                layer.attn_gate.fill_(gate)
                layer.ff_gate.fill_(gate)
    state = {k: v for k, v in peer.state_dict().items()}
    merged = None
    if peer_name == "mmgpt":  # the state above is its OpenFlamingo v1 base; its LoRA file holds the adapters
        peer, finetune = _with_random_mmgpt_lora(peer, seed)

        def convert(**kwargs: Any) -> tuple[Flamingo, FlamingoProcessor]:
            return convert_mmgpt(finetune, state, copy.deepcopy(lm), copy.deepcopy(tok), vision=copy.deepcopy(vision),
                                 image_processor=image_processor, **kwargs)

        (ours, processor), (merged, _) = convert(), convert(merge_lm_lora=True)
    else:
        ours, processor = convert_openflamingo(state, copy.deepcopy(vision), copy.deepcopy(lm), copy.deepcopy(tok),
                                               image_processor=image_processor, attend_next_image=peer_name == "v1")
    bare = copy.deepcopy(lm)  # mmgpt: the LM without its adapters (merged, they cost nothing per step)
    bare.resize_token_embeddings(len(peer_tok))
    for m in (ours, peer, bare) + ((merged,) if merged is not None else ()):
        m.to(device=device, dtype=dtype).eval()
    return Pair(ours, peer, bare, processor, spec["vision"]["image_size"], peer_name, merged)


def _with_random_mmgpt_lora(peer: torch.nn.Module, seed: int, std: float = 0.05) -> tuple[torch.nn.Module, dict]:
    """Multimodal-GPT's LoRA (its `LORA_CONFIG`) on an OpenFlamingo v1 model of its modules, `lora_B` drawn from
    N(0, std) so the adapters change the output (fresh, they are zero); returns the model and its LoRA file's
    content as mmgpt's training saves it (behind DDP's `module.`, with its tuning config)."""
    apply_mmgpt_lora(peer)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in peer.named_parameters():
            if ".lora_B" in name:
                p.normal_(0.0, std)
    lora = {"module." + k: v.clone() for k, v in peer.state_dict().items() if ".lora_" in k}
    return peer.eval(), {"model_state_dict": lora, "tuning_config": dict(LORA_CONFIG)}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of `fn` in seconds."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class StepClock:
    """An HF streamer that timestamps every generation step (HF calls `put` with the prompt, then once per new
    token, after copying it to the CPU, so each stamp is taken after the step's work finished).

    ttft = first new token - start (vision + prefill + one step); decode time = last token - first token, over
    N - 1 decode steps: measured inside one run, so noise between runs does not enter the difference."""

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self.start = time.perf_counter()

    def put(self, value: Any) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass

    def ttft(self) -> float:
        return self.stamps[1] - self.start

    def decode_seconds_per_step(self) -> float:
        steps = self.stamps[1:]
        if len(steps) < 2:  # one new token: no decode step to time (NaN: a null column, not a division by zero)
            return float("nan")
        return (steps[-1] - steps[0]) / (len(steps) - 1)


def interleaved(fns: dict[str, Callable[[StepClock], Any]], device: str, repeats: int
                ) -> dict[str, tuple[float, float]]:
    """Median (time to first token, seconds per decode step) of each `fn(clock)`, the runs of the models taking
    turns (one warm-up each first), so that a change in the machine's load falls on both alike."""
    for fn in fns.values():
        fn(StepClock())
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            clock = StepClock()
            fn(clock)
            samples[name].append((clock.ttft(), clock.decode_seconds_per_step()))
    return {name: (statistics.median(t for t, _ in runs), statistics.median(s for _, s in runs))
            for name, runs in samples.items()}


def timing_columns(timings: dict[str, tuple[float, float]], batch: int) -> dict[str, float]:
    """`interleaved`'s (time to first token, seconds per decode step) per model -> `{name}_ttft_ms` and
    `{name}_decode_tok_s` (rows of `batch` sequences)."""
    columns = {}
    for name, (ttft, per_step) in timings.items():
        columns[f"{name}_ttft_ms"] = ttft * 1e3
        columns[f"{name}_decode_tok_s"] = batch / per_step
    return columns


def add_generation_options(parser: Any, shapes: Any, images: list[int], repeats: int) -> None:
    """The options of a generation bench against a peer (shape, images per prompt, batch sizes, forced new tokens,
    device, dtype, repeats)."""
    from flamingo.runtime import DTYPE_NAMES

    parser.add_argument("--shape", default="cpu", choices=sorted(shapes))
    parser.add_argument("--images", type=int, nargs="+", default=images)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPE_NAMES))
    parser.add_argument("--repeats", type=int, default=repeats)


def timed_steps(fn: Callable[[StepClock], Any], device: str, repeats: int = 3) -> tuple[float, float]:
    """Median (time to first token, seconds per decode step) of `fn(clock)` over `repeats` runs after a warm-up."""
    fn(StepClock())
    ttfts, steps = [], []
    for _ in range(repeats):
        sync(device)
        clock = StepClock()
        fn(clock)
        ttfts.append(clock.ttft())
        steps.append(clock.decode_seconds_per_step())
    return statistics.median(ttfts), statistics.median(steps)


def profile_steps(fn: Callable[[], Any], device: str, name: str, steps: int = 3, rows: int = 25) -> dict[str, float]:
    """torch.profiler over `steps` calls of `fn` (after one warm-up): prints the top kernels by device time and the
    top host ops by self CPU time, and returns per-step wall ms, device-busy ms (sum of kernel times), kernels, and
    the device's idle fraction of the step (None without device kernels)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    fn()
    sync(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        sync(device)
        wall = (time.perf_counter() - start) / steps
    averages = prof.key_averages()
    kernels = [e for e in averages if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_us = sum(e.self_device_time_total for e in kernels)
    launches = sum(e.count for e in kernels)
    print(f"### profile: {name}")
    if kernels:
        print(averages.table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=70))
    print(averages.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=70))
    busy_ms = busy_us / 1e3 / steps
    out = {"wall_ms": wall * 1e3, "device_busy_ms": busy_ms, "kernels_per_step": launches / steps,
           # the share of the step the GPU runs no kernel (kernels on other streams may overlap: clamped at 0)
           "device_idle_fraction": max(0.0, 1 - busy_ms / (wall * 1e3)) if kernels else None}
    print_json(f"profile.{name}", out)
    return out


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU x{torch.get_num_threads()} threads"


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    widths = [max([len(c), *(len(_fmt(r.get(c))) for r in rows)]) for c in columns]
    print(" | ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("-|-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))


def parse_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """`parser.parse_args(argv)`, then its `--device` checked (`flamingo.runtime.device.check_device`): a device not
    usable here (`gpu`, `cuda` on a CPU machine) is a one-line usage error before any model is built, not a
    traceback from deep inside `model.to` (or, for the `gpu` shape, a model built in host memory first)."""
    args = parser.parse_args(argv)
    if getattr(args, "device", None) is not None:
        try:
            check_device(args.device)
        except ValueError as e:
            parser.error(str(e))
    return args


def print_json(name: str, payload: dict[str, Any]) -> None:
    """The bench's JSON line: valid JSON (`json_safe`), one line."""
    print(json.dumps(json_safe({"bench": name, **payload}), allow_nan=False))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return "" if value is None else str(value)
