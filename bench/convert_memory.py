"""Peak resident memory and wall time of converting an IDEFICS, an Otter and a whole OpenFlamingo checkpoint, as the
library converts (`new`: the HF models built with their parameters on the meta device, each tensor read from its
file alone, renamed, and assigned as the parameter; an OpenFlamingo file memory-mapped, a sample of its frozen LM
compared) and as it converted before (`old`: every tensor read at once, the models built with random init, the
tensors copied into them by `load_state_dict`; kept here only, as `random_init_then_copy`).

    python -m bench.convert_memory --shape cpu              # 2 CPU cores: ~2 min
    python -m bench.convert_memory --shape tiny --repeats 1 # a smoke run

Shapes (random weights written as safetensors in `--checkpoint-dtype`, bf16 by default; nothing downloaded):
- `cpu`: IDEFICS-shaped (transformers' `IdeficsForVisionText2Text`): a Llama of hidden 1024 x 8 layers (vocab
  32000 + 2), gated cross-attention layers before every 2nd, a CLIP-shaped tower 768 wide x 6 layers at 224 px, a
  perceiver of 64 latents x 6 layers (606 MiB in bf16). Otter-shaped (Otter's own `OtterForConditionalGeneration`,
  when otter-ai is installed): the same Llama (vocab 32000 + 4), OpenFlamingo blocks before every 2nd layer, a CLIP
  tower 1024 wide (Otter fixes its resampler's width) x 4 layers at 224 px (619 MiB). OpenFlamingo-shaped (its own
  classes, open-flamingo 2.0.1): the same Llama, blocks before every 2nd layer, a CLIP tower of the IDEFICS shape's
  widths, the whole `state_dict()` saved as `model.pt` (Med-Flamingo's layout; 554 MiB), the LM and tower beside it.
- `tiny`: the test suite's widths (hidden 32; Otter's resampler stays 1024 wide), a smoke run: the conversion's own
  overheads (tokenizer, imports it makes) outweigh such weights, so its ratios mean nothing.
Each conversion runs in a fresh subprocess (one per variant and repeat, the variants taking turns). Its baseline is
its resident set after importing torch, transformers and flamingo, where its peak is reset (`/proc/self/clear_refs`);
its peak is the kernel's high-water mark of its resident set (`VmHWM`) when the conversion returned; `held` is its
resident set then (the model alive, freed heap pages given back). Columns: (peak - baseline) / checkpoint bytes,
(held - baseline) / checkpoint bytes, seconds of the conversion (medians over repeats), and our trained parts'
share of the weights (`trained_over_weights`: the perceiver and the blocks). The file was just written, so every
run reads it from the page cache: the time is the conversion's, not the disk's.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import glob
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Iterator, Optional
from unittest import mock

import torch
from transformers import PreTrainedModel

from bench.common import machine, print_json, print_table
from flamingo.convert import checkpoints, idefics, lm_families, openflamingo, otter
from flamingo.convert.checkpoints import CheckpointTensors, open_tensors
from flamingo.model.cast import to_dtype
from flamingo.runtime import torch_dtype
from flamingo.runtime.dtypes import DTYPE_NAMES
from flamingo.runtime.host_memory import status_kib
from flamingo.tiny import tiny_tokenizer

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(lm=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4),
                 vision=dict(embed_dim=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             image_size=32, patch_size=8), perceiver=dict(resampler_n_latents=8, resampler_depth=2,
                                                                          resampler_n_heads=4, resampler_head_dim=8),
                 otter_vision=dict(intermediate_size=2048, num_hidden_layers=1, num_attention_heads=4, image_size=32,
                                   patch_size=8), vocab=300),
    "cpu": dict(lm=dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=8),
                vision=dict(embed_dim=768, intermediate_size=3072, num_hidden_layers=6, num_attention_heads=12,
                            image_size=224, patch_size=14), perceiver=dict(resampler_n_latents=64, resampler_depth=6,
                                                                           resampler_n_heads=16,
                                                                           resampler_head_dim=96),
                otter_vision=dict(intermediate_size=4096, num_hidden_layers=4, num_attention_heads=16, image_size=224,
                                  patch_size=14), vocab=32000),
}
KINDS = ("idefics", "otter", "openflamingo")
PATHS = ("old", "new")
IDEFICS_MARKERS = ["<fake_token_around_image>", "<image>"]


# ---------------------------------------------------------------------------------------------------- checkpoints
def _tokenizer(shape: str) -> Any:
    vocab = SHAPES[shape]["vocab"]
    return tiny_tokenizer(pad_vocab_to=vocab) if vocab > 300 else tiny_tokenizer()


def write_idefics(directory: str, shape: str, dtype: torch.dtype) -> None:
    """transformers' `IdeficsForVisionText2Text` on random weights, saved with its tokenizer."""
    from transformers import IdeficsConfig, IdeficsForVisionText2Text

    spec = SHAPES[shape]
    tok = _tokenizer(shape)
    tok.add_special_tokens({"additional_special_tokens": IDEFICS_MARKERS})
    tok.pad_token = tok.eos_token
    config = IdeficsConfig(vocab_size=len(tok) - 2, additional_vocab_size=2, cross_layer_interval=2,
                           qk_layer_norms=True, alpha_type="vector", use_resampler=True, pad_token_id=0,
                           bos_token_id=0, eos_token_id=0, max_position_embeddings=2048, vision_config=spec["vision"],
                           perceiver_config=dict(use_resampler=True, qk_layer_norms_perceiver=True,
                                                 **spec["perceiver"]), **spec["lm"])
    torch.manual_seed(0)
    IdeficsForVisionText2Text(config).to(dtype).save_pretrained(directory)
    tok.save_pretrained(directory)


def write_otter(directory: str, tokenizer_dir: str, shape: str, dtype: torch.dtype) -> None:
    """Otter's own `OtterForConditionalGeneration` (otter-ai) on random weights, saved; the base tokenizer (a path
    naming "llama": Otter picks LLaMA's tokenizer by it) in `tokenizer_dir`."""
    from otter_ai.models.otter.configuration_otter import OtterConfig
    from otter_ai.models.otter.modeling_otter import OtterForConditionalGeneration
    from transformers import CLIPVisionConfig, LlamaConfig

    spec = SHAPES[shape]
    tok = _tokenizer(shape)
    tok.save_pretrained(tokenizer_dir)
    text = LlamaConfig(vocab_size=len(tok) + 4, num_key_value_heads=spec["lm"]["num_attention_heads"],
                       bos_token_id=0, eos_token_id=0, max_position_embeddings=2048, **spec["lm"]).to_dict()
    text.update(_name_or_path=tokenizer_dir, architectures=["LlamaForCausalLM"])
    vision = CLIPVisionConfig(hidden_size=1024, **spec["otter_vision"]).to_dict()
    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):  # Otter prints every parameter
        model = OtterForConditionalGeneration(OtterConfig(vision_config=vision, text_config=text,
                                                          cross_attn_every_n_layers=2))
    model.to(dtype).save_pretrained(directory)


def write_openflamingo(directory: str, shape: str, dtype: torch.dtype) -> None:
    """A whole OpenFlamingo `state_dict()` as Med-Flamingo's `model.pt` holds one (its frozen LM included), built by
    OpenFlamingo's own classes on a Llama and a CLIP tower, which are saved beside it as `lm/` and `vision/`."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from flamingo.peers.openflamingo import build_openflamingo
    from flamingo.tiny import tiny_image_processor

    spec = SHAPES[shape]
    tok = _tokenizer(shape)
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), num_key_value_heads=spec["lm"]["num_attention_heads"],
                                      bos_token_id=0, eos_token_id=0, **spec["lm"]))
    v = spec["vision"]
    vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=v["embed_dim"], **{k: x for k, x in v.items()
                                                                             if k != "embed_dim"}))
    os.makedirs(directory)
    lm.to(dtype).save_pretrained(os.path.join(directory, "lm"))
    tok.save_pretrained(os.path.join(directory, "lm"))
    vision.to(dtype).save_pretrained(os.path.join(directory, "vision"))
    tiny_image_processor("clip", image_size=v["image_size"]).save_pretrained(os.path.join(directory, "vision"))
    peer, _ = build_openflamingo(vision, lm, tok, cross_attn_every_n_layers=2)
    torch.save(peer.to(dtype).state_dict(), os.path.join(directory, "model.pt"))


def checkpoint_bytes(directory: str) -> int:
    whole = os.path.join(directory, "model.pt")
    if os.path.isfile(whole):
        return os.path.getsize(whole)
    return sum(os.path.getsize(f) for f in glob.glob(os.path.join(directory, "*.safetensors")))


# --------------------------------------------------------------------------------------------------- the old path
def _read_all(directory: str, *, allow_bin: bool = True) -> CheckpointTensors:
    from safetensors.torch import load_file

    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if files:
        state = {k: v for f in files for k, v in load_file(f).items()}
    else:
        state = dict(open_tensors(directory, allow_bin=allow_bin).items())
    return CheckpointTensors.of_dict(state, copy=False)


def _copy_into(model: torch.nn.Module, state: Any) -> tuple[list[str], list[str]]:
    result = model.load_state_dict(dict(state), strict=False)
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            module.tie_weights()
    return list(result.missing_keys), list(result.unexpected_keys)


def _float32(dtype: torch.dtype) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


_torch_load = torch.load


def _load_whole(*args: Any, **kwargs: Any) -> Any:
    kwargs.pop("mmap", None)
    return _torch_load(*args, **kwargs)


@contextlib.contextmanager
def random_init_then_copy() -> Iterator[None]:
    """The conversions as they were before meta-device builds: every tensor of the checkpoint read at once, the
    models built with random init (our trained parts in float32, cast after), the tensors copied into them
    (`load_state_dict`)."""
    with contextlib.ExitStack() as stack:
        for module in (idefics, otter, lm_families, checkpoints):
            for name, replacement in (("meta_parameters", contextlib.nullcontext), ("assign_tensors", _copy_into),
                                      ("open_tensors", _read_all), ("default_dtype", _float32)):
                if hasattr(module, name):
                    stack.enter_context(mock.patch.object(module, name, replacement))
        # an OpenFlamingo checkpoint read whole (not memory-mapped), its frozen LM tensors not compared
        stack.enter_context(mock.patch.object(torch, "load", _load_whole))
        stack.enter_context(mock.patch.object(openflamingo, "check_frozen_lm", lambda state, lm: None))
        yield


def convert(kind: str, path: str, directory: str, tokenizer_dir: Optional[str] = None,
            dtype: Optional[torch.dtype] = None) -> Any:
    """`from_idefics` / `from_otter` on `directory` by the `new` or `old` path; returns the model."""
    with random_init_then_copy() if path == "old" else contextlib.nullcontext():
        if kind == "idefics":
            model, _ = idefics.from_idefics(directory, torch_dtype=dtype)
        elif kind == "openflamingo":
            files = [os.path.join(directory, name) for name in ("model.pt", "vision", "lm")]
            if path == "old":  # read in float32, then cast (as the library casts: rotary buffers kept float32)
                model, _ = openflamingo.convert_openflamingo(*files)
                if dtype is not None:
                    to_dtype(model, dtype)
            else:  # read in the dtype asked for (`run` passes the checkpoint's by default)
                model, _ = openflamingo.convert_openflamingo(*files, torch_dtype=dtype)
        else:
            model, _ = otter.from_otter(directory, tokenizer=tokenizer_dir, torch_dtype=dtype)
    return model


# ------------------------------------------------------------------------------------------------------ processes
def _status_kib(field: str) -> int:
    """`VmRSS` (resident now) or `VmHWM` (its peak) of this process, in KiB (Linux only)."""
    value = status_kib(field)
    if value is None:
        raise RuntimeError(f"no {field} in /proc/self/status: this bench measures Linux processes")
    return value


def _reset_peak() -> None:
    """Start the peak (`VmHWM`) at the present resident set: importing the libraries peaks higher than what is left
    resident after, which would hide a small conversion's peak. (`getrusage`'s `ru_maxrss` is no measure here: it
    keeps the resident set of the forked parent this process was exec'd from.)"""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _release_freed() -> None:
    """Give freed heap pages back to the system (glibc), so that `held` counts live memory."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def child(kind: str, path: str, directory: str, tokenizer_dir: Optional[str], dtype: Optional[str]) -> None:
    """One conversion in this (fresh) process: prints its baseline, peak and held resident KiB and seconds."""
    gc.collect()
    _reset_peak()
    baseline = _status_kib("VmRSS")
    start = time.perf_counter()
    model = convert(kind, path, directory, tokenizer_dir, torch_dtype(dtype) if dtype else None)
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    gc.collect()
    _release_freed()
    held = _status_kib("VmRSS")
    model_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    trained = sum(p.numel() * p.element_size() for p in (*model.resampler.parameters(), *model.xattn.parameters()))
    print(json.dumps({"baseline_kib": baseline, "peak_kib": peak, "held_kib": held, "seconds": seconds,
                      "model_bytes": model_bytes, "trained_bytes": trained}))


def run_child(kind: str, path: str, directory: str, tokenizer_dir: Optional[str], dtype: Optional[str]
              ) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.convert_memory", "--child", kind, path, directory, tokenizer_dir or "",
               dtype or ""]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(command, capture_output=True, text=True, cwd=root, check=False)
    if done.returncode:
        raise RuntimeError(f"{kind}/{path} conversion failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    kinds = list(args.kinds)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        directories: dict[str, tuple[str, Optional[str]]] = {}
        stored = torch_dtype(args.checkpoint_dtype)
        if "idefics" in kinds:
            write_idefics(os.path.join(work, "idefics"), args.shape, stored)
            directories["idefics"] = (os.path.join(work, "idefics"), None)
        if "otter" in kinds:
            try:
                import otter_ai  # noqa: F401
            except ImportError:
                print("# otter-ai is not installed: no Otter rows")
                kinds.remove("otter")
            else:
                tok_dir = os.path.join(work, "llama-tokenizer")
                write_otter(os.path.join(work, "otter"), tok_dir, args.shape, stored)
                directories["otter"] = (os.path.join(work, "otter"), tok_dir)
        if "openflamingo" in kinds:
            write_openflamingo(os.path.join(work, "openflamingo"), args.shape, stored)
            directories["openflamingo"] = (os.path.join(work, "openflamingo"), None)
        for kind in kinds:
            directory, tok_dir = directories[kind]
            size = checkpoint_bytes(directory)
            runs: dict[str, list[dict[str, Any]]] = {path: [] for path in PATHS}
            for _ in range(args.repeats):
                for path in PATHS:  # in turns: a change in the machine's load falls on both
                    # an OpenFlamingo model in the checkpoint's dtype by default, as IDEFICS and Otter read theirs:
                    # the new path reads in it, the old one reads float32 and casts (the same model either way)
                    dtype = args.dtype or (args.checkpoint_dtype if kind == "openflamingo" else None)
                    runs[path].append(run_child(kind, path, directory, tok_dir, dtype))
            for path in PATHS:
                rs = runs[path]
                row = {"kind": kind, "path": path, "checkpoint_mib": size / 2**20,
                       "baseline_mib": statistics.median(r["baseline_kib"] for r in rs) / 1024,
                       "peak_over_weights": statistics.median((r["peak_kib"] - r["baseline_kib"]) * 1024 / size
                                                              for r in rs),
                       "held_over_weights": statistics.median((r["held_kib"] - r["baseline_kib"]) * 1024 / size
                                                              for r in rs),
                       "seconds": statistics.median(r["seconds"] for r in rs),
                       "model_over_weights": rs[0]["model_bytes"] / size,
                       "trained_over_weights": rs[0]["trained_bytes"] / size,
                       "peaks_over_weights": [round((r["peak_kib"] - r["baseline_kib"]) * 1024 / size, 3) for r in rs]}
                rows.append(row)
                print_json("convert_memory", {"shape": args.shape, "device": machine(),
                                              "checkpoint_dtype": args.checkpoint_dtype, "dtype": args.dtype,
                                              "torch": torch.__version__, **row})
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, path, directory, tokenizer_dir, dtype = sys.argv[2:7]
        child(kind, path, directory, tokenizer_dir or None, dtype or None)
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="cpu", choices=sorted(SHAPES))
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--checkpoint-dtype", default="bf16", choices=sorted(DTYPE_NAMES))
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPE_NAMES),
                        help="the conversion's torch_dtype (default: the checkpoint's)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"# bench.convert_memory on {machine()}, shape={args.shape}, checkpoint {args.checkpoint_dtype}, "
          f"converted to {args.dtype or 'the same'}")
    rows = run(args)
    print_table(rows, ["kind", "path", "checkpoint_mib", "peak_over_weights", "held_over_weights", "seconds",
                       "trained_over_weights"])


if __name__ == "__main__":
    main()
