"""Generation speed: ours (converted by `from_otter`) vs Otter's own model, same weights.

    python -m bench.otter --shape cpu                           # 2 CPU cores, fp32
    python -m bench.otter --shape tiny --images 2 --batch 1 --repeats 1   # a smoke run

Shapes (random weights, nothing downloaded; Otter fixes its resampler at 1024 wide, 6 layers of 8 heads of 64):
- `cpu`: a LLaMA of hidden 512 x 8 layers (vocab 32000 + 4 added), blocks every 2nd layer, a CLIP tower 1024 wide x 2
  layers at 64 px.
- `tiny`: hidden 32 x 4 layers, a 1-layer tower at 32 px, for a smoke run.
For k images in Otter's in-context format (k - 1 answered turns, then the question), batch 1 and 8, greedy, N forced
new tokens: time to first token and decode tokens/s = batch / (seconds per decode step), steps timestamped by a
streamer (bench/common.py), medians over runs in which the models take turns. Otter is timed as its `generate` runs
(KV cache on) and without the cache (`use_cache=False`): with the cache its layers take each step's media locations
from the new token alone, so the generated tokens see no image and its answers differ from ours; without it they are
ours (docs/convert.md), at the cost of re-running the whole sequence every step. Otter re-projects every image's keys
and values in every block at every step; ours projects them once per prompt.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
from typing import Any

import torch

from bench.common import (
    add_generation_options,
    interleaved,
    machine,
    parse_args,
    print_json,
    print_table,
    timing_columns,
)
from flamingo.convert import from_otter
from flamingo.runtime import torch_dtype
from flamingo.tiny import tiny_lm, tiny_tokenizer, tiny_vision

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(lm=dict(), vision=dict(num_layers=1, image_size=32), every=2, vocab=300),
    "cpu": dict(lm=dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                        num_key_value_heads=8), vision=dict(num_layers=2, image_size=64, patch_size=8), every=2,
                vocab=32000),
}
TURN = "<image>User: What is in the image? GPT:<answer> a red circle on a blue square.<|endofchunk|>"
QUESTION = "<image>User: What is in the image? GPT:<answer>"


def build(shape: str, device: str, dtype: torch.dtype, work: str, gate: float = 0.5) -> tuple[Any, Any, Any]:
    """Otter's model on random weights (gates set to `gate`), saved and converted to ours."""
    from otter_ai.models.otter.configuration_otter import OtterConfig
    from otter_ai.models.otter.modeling_otter import OtterForConditionalGeneration

    spec = SHAPES[shape]
    tok_dir = os.path.join(work, "llama-tokenizer")  # Otter finds LLaMA's tokenizer by "llama" in the LM's path
    tok = tiny_tokenizer(pad_vocab_to=spec["vocab"]) if spec["vocab"] > 300 else tiny_tokenizer()
    tok.save_pretrained(tok_dir)
    text = tiny_lm("llama", vocab_size=len(tok) + 4, **spec["lm"]).config.to_dict()
    text.update(_name_or_path=tok_dir, architectures=["LlamaForCausalLM"], max_position_embeddings=4096)
    vision = tiny_vision("clip", hidden_size=1024, **spec["vision"]).config.to_dict()
    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):  # Otter prints every parameter
        peer = OtterForConditionalGeneration(OtterConfig(vision_config=vision, text_config=text,
                                                         cross_attn_every_n_layers=spec["every"])).eval()
    with torch.no_grad():
        for name, p in peer.named_parameters():
            if name.endswith("_gate"):
                p.fill_(gate)
    peer.save_pretrained(os.path.join(work, "otter"))
    ours, processor = from_otter(os.path.join(work, "otter"), tokenizer=tok_dir)
    peer.to(device=device, dtype=dtype)
    ours.to(device=device, dtype=dtype)
    return ours, peer, processor


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    dtype = torch_dtype(args.dtype)
    with tempfile.TemporaryDirectory() as work:
        ours, peer, processor = build(args.shape, args.device, dtype, work)
    size = SHAPES[args.shape]["vision"]["image_size"]
    rows = []
    for images_per_prompt in args.images:
        for batch in args.batch:
            prompt = TURN * (images_per_prompt - 1) + QUESTION
            ids = torch.tensor(processor.prompt_ids(prompt), device=args.device).repeat(batch, 1)  # (B, T)
            mask = torch.ones_like(ids)
            pixels = torch.randn(batch, images_per_prompt, 1, 3, size, size, device=args.device, dtype=dtype)
            new = args.new_tokens

            def ours_gen(streamer: Any = None) -> torch.Tensor:
                return ours.generate(ids, mask, pixels, max_new_tokens=new, min_new_tokens=new, streamer=streamer)

            def otter_gen(streamer: Any = None, use_cache: bool = True) -> torch.Tensor:
                return peer.generate(vision_x=pixels, lang_x=ids, attention_mask=mask, max_new_tokens=new,
                                     min_new_tokens=new, do_sample=False, num_beams=1, pad_token_id=0,
                                     use_cache=use_cache, streamer=streamer)

            def otter_uncached(streamer: Any = None) -> torch.Tensor:
                return otter_gen(streamer, use_cache=False)

            row: dict[str, Any] = {"images": images_per_prompt, "batch": batch, "ctx_tokens": ids.shape[1]}
            with torch.inference_mode():
                mine = ours_gen()
                row["same_tokens_uncached"] = torch.equal(mine, otter_uncached())
                row["same_tokens_cached"] = torch.equal(mine, otter_gen())
                timings = interleaved({"ours": ours_gen, "otter": otter_gen, "otter_nocache": otter_uncached},
                                      args.device, args.repeats)
            row.update(timing_columns(timings, batch))
            row["decode_vs_otter"] = row["ours_decode_tok_s"] / row["otter_decode_tok_s"]
            row["decode_vs_otter_nocache"] = row["ours_decode_tok_s"] / row["otter_nocache_decode_tok_s"]
            rows.append(row)
            print_json("otter", {"shape": args.shape, "device": machine(), "dtype": args.dtype, "new_tokens": new,
                                 **row})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generation_options(parser, SHAPES, images=[4, 16], repeats=3)
    args = parse_args(parser)
    print(f"# bench.otter on {machine()}, shape={args.shape}, dtype={args.dtype}")
    rows = run(args)
    print_table(rows, ["images", "batch", "ctx_tokens", "same_tokens_uncached", "same_tokens_cached", "ours_ttft_ms",
                       "otter_ttft_ms", "ours_decode_tok_s", "otter_decode_tok_s", "otter_nocache_decode_tok_s",
                       "decode_vs_otter", "decode_vs_otter_nocache"])


if __name__ == "__main__":
    main()
