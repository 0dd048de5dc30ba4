"""Generation speed: ours (converted by `from_idefics`) vs transformers' IDEFICS, same weights, same tokens.

    python -m bench.idefics --shape cpu                          # 2 CPU cores, fp32
    python -m bench.idefics --shape gpu --device cuda --dtype bf16   # a 9B-like layer shape, fewer layers

Shapes (random weights, nothing downloaded):
- `cpu`: IDEFICS-shaped, Llama hidden 512 x 8 layers (vocab 32000 + 2 added), cross-layer interval 2, a CLIP-shaped
  tower 256 wide x 4 layers at 64 px, a perceiver of 64 latents x 2 layers (4 heads of 64), q/k norms on.
- `gpu`: IDEFICS-9B's layer shapes (hidden 4096, 32 heads, MLP 11008; tower 1280 wide at 224 px / 14; perceiver 64
  latents x 6 layers of 16 heads of 96) with 4 LM layers and 4 tower layers.
- `tiny`: the test-suite shape, for a smoke run.
For k images (k - 1 answered turns plus the question, IDEFICS's prompt format), batch 1 and 8, greedy, N forced new
tokens: time to first token (vision + perceiver + prefill + first step) and decode tokens/s = batch / (seconds per
decode step), the steps timestamped inside each run by a streamer (bench/common.py), medians over runs in which the
two models take turns (the cores are shared: a load change then falls on both). IDEFICS re-runs its perceiver
and re-projects every image's keys and values in every cross-attention layer at every decode step (it has no
cross-attention cache); ours projects them once per prompt and reads the last image's.
"""

from __future__ import annotations

import argparse
import copy
from typing import Any

import torch
from transformers import IdeficsConfig, IdeficsForVisionText2Text
from transformers.models.idefics.processing_idefics import (
    image_attention_mask_for_packed_input_ids,
    incremental_to_binary_attention_mask,
)

from bench.common import (
    add_generation_options,
    interleaved,
    machine,
    parse_args,
    print_json,
    print_table,
    timing_columns,
)
from flamingo.convert import from_idefics
from flamingo.runtime import torch_dtype
from flamingo.tiny import tiny_tokenizer

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(lm=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4),
                 vision=dict(embed_dim=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             image_size=32, patch_size=8),
                 perceiver=dict(resampler_n_latents=8, resampler_depth=2, resampler_n_heads=4, resampler_head_dim=8),
                 vocab=300),
    "cpu": dict(lm=dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8),
                vision=dict(embed_dim=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                            image_size=64, patch_size=8),
                perceiver=dict(resampler_n_latents=64, resampler_depth=2, resampler_n_heads=4, resampler_head_dim=64),
                vocab=32000),
    "gpu": dict(lm=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=4, num_attention_heads=32),
                vision=dict(embed_dim=1280, intermediate_size=5120, num_hidden_layers=4, num_attention_heads=16,
                            image_size=224, patch_size=14),
                perceiver=dict(resampler_n_latents=64, resampler_depth=6, resampler_n_heads=16, resampler_head_dim=96),
                vocab=32000),
}
TURN = "User:<image>What is in the image?\nAssistant: a red circle on a blue square.\n"
QUESTION = "User:<image>What is in the image?\nAssistant:"


def build(shape: str, device: str, dtype: torch.dtype, alpha: float = 0.3, seed: int = 0) -> tuple[Any, Any, Any]:
    """transformers' IDEFICS on random weights (alphas set to `alpha`), and ours converted from it."""
    spec = SHAPES[shape]
    tok = tiny_tokenizer(pad_vocab_to=spec["vocab"]) if spec["vocab"] > 300 else tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<fake_token_around_image>", "<image>"]})
    tok.pad_token = tok.eos_token
    config = IdeficsConfig(
        vocab_size=len(tok) - 2, additional_vocab_size=2, cross_layer_interval=2, qk_layer_norms=True,
        use_resampler=True, pad_token_id=0, bos_token_id=0, eos_token_id=0, max_position_embeddings=4096,
        vision_config=spec["vision"], perceiver_config=dict(use_resampler=True, qk_layer_norms_perceiver=True,
                                                            **spec["perceiver"]), **spec["lm"])
    torch.manual_seed(seed)
    peer = IdeficsForVisionText2Text(config).eval()
    with torch.no_grad():
        for layer in peer.model.gated_cross_attn_layers:
            layer.alpha_cross_attn.fill_(alpha)
            layer.alpha_dense.fill_(alpha)
    ours, processor = from_idefics(peer, copy.deepcopy(tok))
    peer.to(device=device, dtype=dtype)
    ours.to(device=device, dtype=dtype)
    return ours, peer, processor


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    dtype = torch_dtype(args.dtype)
    ours, peer, processor = build(args.shape, args.device, dtype)
    tok, size = processor.tokenizer, SHAPES[args.shape]["vision"]["image_size"]
    rows = []
    for images_per_prompt in args.images:
        for batch in args.batch:
            prompt = TURN * (images_per_prompt - 1) + QUESTION
            ids = torch.tensor([processor.encode_prompt(prompt, [torch.zeros(3, size, size)] * images_per_prompt)[0]]
                               * batch, device=args.device)  # (B, T): IDEFICS's format, through our template
            mask = torch.ones_like(ids)
            pixels = torch.randn(batch, images_per_prompt, 3, size, size, device=args.device, dtype=dtype)
            incremental, _ = image_attention_mask_for_packed_input_ids(ids.cpu(), tok, "pt")
            image_mask = incremental_to_binary_attention_mask(incremental, "pt", num_classes=images_per_prompt)
            image_mask = image_mask.to(args.device)
            new, image_id = args.new_tokens, ours.config.media_token_id

            def ours_gen(streamer: Any = None) -> torch.Tensor:
                return ours.generate(ids, mask, pixels[:, :, None], max_new_tokens=new, min_new_tokens=new,
                                     streamer=streamer)

            def peer_gen(streamer: Any = None) -> torch.Tensor:
                return peer.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                                     image_attention_mask=image_mask, max_new_tokens=new, min_new_tokens=new,
                                     do_sample=False, num_beams=1, suppress_tokens=[image_id], pad_token_id=0,
                                     streamer=streamer)

            row: dict[str, Any] = {"images": images_per_prompt, "batch": batch, "ctx_tokens": ids.shape[1]}
            with torch.inference_mode():
                row["same_tokens"] = torch.equal(ours_gen(), peer_gen())
                timings = interleaved({"ours": ours_gen, "idefics": peer_gen}, args.device, args.repeats)
            row.update(timing_columns(timings, batch))
            row["decode_vs_idefics"] = row["ours_decode_tok_s"] / row["idefics_decode_tok_s"]
            row["ttft_vs_idefics"] = row["idefics_ttft_ms"] / row["ours_ttft_ms"]
            rows.append(row)
            print_json("idefics", {"shape": args.shape, "device": machine(), "dtype": args.dtype,
                                   "new_tokens": new, **row})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generation_options(parser, SHAPES, images=[4, 8, 32], repeats=5)
    args = parse_args(parser)
    print(f"# bench.idefics on {machine()}, shape={args.shape}, dtype={args.dtype}")
    rows = run(args)
    print_table(rows, ["images", "batch", "ctx_tokens", "same_tokens", "ours_ttft_ms", "idefics_ttft_ms",
                       "ours_decode_tok_s", "idefics_decode_tok_s", "decode_vs_idefics", "ttft_vs_idefics"])


if __name__ == "__main__":
    main()
