"""Generation speed: ours vs a peer (OpenFlamingo 2.0.1, v1 or Multimodal-GPT) vs the bare LM, same weights, same
process.

    python -m bench.generate --shape cpu                       # 2 CPU cores, fp32
    python -m bench.generate --shape gpu --device cuda --dtype bf16
    python -m bench.generate --shape gpu --device cuda --dtype bf16 --compile     # CUDA-graphed decode steps
    python -m bench.generate --shape cpu --lm mosaic_gpt       # OpenFlamingo-3B's LM family (bench/common.py)
    python -m bench.generate --shape cpu --peer v1             # OpenFlamingo v1 (0.0.2), converted with v1's rule
    python -m bench.generate --shape cpu --peer mmgpt          # Multimodal-GPT: ours with its LM adapters, and merged

For k-shot prompts (one image per shot plus the query), batch 1 and 16, greedy, N new tokens (forced, so every
model decodes the same number): time to first token (vision + prefill + first step) and decode tokens/s
= batch / (seconds per decode step), the steps timestamped inside each run by a streamer (bench/common.py). The
bare LM (HF `generate` on the same LM weights and the same token ids, no images) is the floor: a Flamingo decode
step is an LM step plus small cross-attentions (for mmgpt: the LM without its adapters, the merged LM's cost).
Where the greedy tokens differ from the peer's, the row says where and whether it is a near tie (`divergence`).
Each row's JSON line comes when the row is done; a `generate.partial` line before it, as soon as ours is timed
(a run cut by a time limit in the bare LM's or the peer's timing keeps ours' figures).
"""

from __future__ import annotations

import argparse
import functools
from typing import Any, Optional

import torch

from bench.common import LM_FAMILIES, PEERS, Pair, build_pair, machine, parse_args, print_json, print_table, timed_steps
from flamingo.model.generation import compile_config
from flamingo.runtime import DTYPE_NAMES, torch_dtype

SHOT = "<image>Question: what is in the image? Short answer: a red circle.<|endofchunk|>"
QUERY = "<image>Question: what is in the image? Short answer:"


@torch.inference_mode()
def divergence(pair: Pair, ids: torch.Tensor, mask: torch.Tensor, images: torch.Tensor, ours_new: torch.Tensor,
               peer_new: torch.Tensor, ours: Optional[torch.nn.Module] = None) -> dict[str, Any]:
    """Where greedy decoding of ours and the peer first picks different tokens, and whether that is a near tie.

    ids/mask (B, T) the prompt, images (B, N, F, C, H, W), ours_new/peer_new (B, n) the generated tokens. Both models
    score the common prefix of the earliest differing row in one forward pass. At its last position, each model's
    gap between the two picked tokens is compared with the largest difference between the two models' logits there:
    `near_tie` when both gaps are within it, i.e. the two models' numerical disagreement (e.g. bf16 rounding, other
    kernels) is enough to flip the pick; otherwise the models disagree by more than rounding. ours: the model of
    ours that generated `ours_new` (default `pair.ours`).
    """
    differ = ours_new != peer_new  # (B, n)
    if not bool(differ.any()):
        return {"first_divergence_step": None}
    first = torch.where(differ.any(1), differ.float().argmax(1), differ.shape[1])  # (B,) first differing step
    b = int(first.argmin())
    t = int(first[b])
    prefix = torch.cat([ids[b:b + 1], ours_new[b:b + 1, :t]], dim=1)  # (1, T + t): equal in both up to step t
    prefix_mask = torch.cat([mask[b:b + 1], torch.ones_like(ours_new[b:b + 1, :t])], dim=1)
    ours = pair.ours if ours is None else ours
    ours_logits = ours(input_ids=prefix, attention_mask=prefix_mask, images=images[b:b + 1]).logits[0, -1]
    peer_logits = pair.peer(vision_x=images[b:b + 1], lang_x=prefix, attention_mask=prefix_mask).logits[0, -1]
    ours_logits, peer_logits = ours_logits.float(), peer_logits.float()
    mine, theirs = int(ours_new[b, t]), int(peer_new[b, t])
    ours_gap = float(ours_logits[mine] - ours_logits[theirs])  # > 0: ours prefers its own pick in this forward
    peer_gap = float(peer_logits[theirs] - peer_logits[mine])
    spread = float((ours_logits - peer_logits).abs().max())
    return {"first_divergence_step": t, "divergence_row": b, "ours_logit_gap": ours_gap, "peer_logit_gap": peer_gap,
            "max_logit_diff": spread, "near_tie": max(abs(ours_gap), abs(peer_gap)) <= spread}


def peer_generate(pair: Pair, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, n: int,
                  streamer: Any = None) -> torch.Tensor:
    """The peer's own `generate`, greedy, `n` forced new tokens. v1's (OpenFlamingo 0.0.2's, and Multimodal-GPT's
    copy of it) takes no `min_new_tokens` or streamer: they go to its LM's `generate`, which its body calls."""
    peer, pad = pair.peer, pair.processor.tokenizer.pad_token_id
    if pair.peer_name == "openflamingo":
        return peer.generate(vision_x=images, lang_x=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                             num_beams=1, do_sample=False, streamer=streamer, pad_token_id=pad)
    lm = peer.lang_encoder
    lm.generate = functools.partial(lm.generate, min_new_tokens=n, streamer=streamer, pad_token_id=pad)
    try:
        return peer.generate(vision_x=images, lang_x=ids, attention_mask=mask, max_new_tokens=n, num_beams=1)
    finally:
        del lm.generate  # the instance attribute; its class's `generate` again


def run(args: argparse.Namespace, pair: Optional[Pair] = None) -> list[dict[str, Any]]:
    """pair: models already built for `args` (bench/gpu.py times eager and compiled decoding on the same ones);
    without it, ours and OpenFlamingo 2.0.1's."""
    dtype = torch_dtype(args.dtype)
    if pair is None:
        pair = build_pair(args.shape, xattn_every=args.xattn_every, device=args.device, dtype=dtype, lm=args.lm)
    bare, processor, peer_name = pair.bare_lm, pair.processor, pair.peer_name
    # ours, and for mmgpt ours with the LM's adapters merged: their columns are prefixed by `{name}_` after `ours`
    variants = {"ours": pair.ours, **({"ours_merged": pair.ours_merged} if pair.ours_merged is not None else {})}
    impls = args.xattn_impl
    header = {"shape": args.shape, "lm": args.lm, "peer": peer_name, "device": machine(), "dtype": args.dtype,
              "cache": "static+compile" if args.compile else args.cache, "xattn_every": args.xattn_every,
              "new_tokens": args.new_tokens}
    rows = []
    for shots in args.shots:
        for batch in args.batch:
            prompt_ids = processor.tokenizer(SHOT * shots + QUERY)["input_ids"]
            ids = torch.tensor([prompt_ids] * batch, device=args.device)
            mask = torch.ones_like(ids)
            n_media = shots + 1
            images = torch.randn(batch, n_media, 1, 3, pair.image_size, pair.image_size, device=args.device,
                                 dtype=dtype)
            new = args.new_tokens

            cache = {"cache_implementation": args.cache} if args.cache != "dynamic" else {}
            if args.compile:  # both ours and the bare LM: static cache, decode step under torch.compile
                cache = {"cache_implementation": "static",
                         "compile_config": compile_config(torch.device(args.device).type)}

            def ours_gen(n: int, streamer: Any = None, impl: str = impls[0], model: Any = pair.ours) -> torch.Tensor:
                return model.generate(ids, mask, images, max_new_tokens=n, min_new_tokens=n, streamer=streamer,
                                      xattn_impl=impl, **cache)

            def peer_gen(n: int, streamer: Any = None) -> torch.Tensor:
                return peer_generate(pair, images, ids, mask, n, streamer)

            def bare_gen(n: int, streamer: Any = None) -> torch.Tensor:
                return bare.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                     do_sample=False, pad_token_id=processor.tokenizer.pad_token_id,
                                     streamer=streamer, **cache)

            row: dict[str, Any] = {"shots": shots, "batch": batch, "ctx_tokens": ids.shape[1]}
            with torch.inference_mode():
                runs = [(name, functools.partial(ours_gen, model=model)) for name, model in variants.items()]
                runs.append(("bare_lm", bare_gen))
                if not args.skip_peer:
                    peer_new = peer_gen(new)[:, ids.shape[1]:]
                    for name, model in variants.items():
                        prefix = _prefix(name)
                        ours_new = ours_gen(new, model=model)[:, ids.shape[1]:]
                        row[f"{prefix}same_tokens_as_peer"] = torch.equal(ours_new, peer_new)
                        if not row[f"{prefix}same_tokens_as_peer"]:  # a near tie (rounding) or a real difference?
                            report = divergence(pair, ids, mask, images, ours_new, peer_new, model)
                            row.update({prefix + key: value for key, value in report.items()})
                    runs.append((peer_name, peer_gen))
                for i, (name, fn) in enumerate(runs):
                    ttft, per_step = timed_steps(lambda clock: fn(new, clock), args.device, args.repeats)
                    row[f"{name}_ttft_ms"] = ttft * 1e3
                    row[f"{name}_decode_tok_s"] = batch / per_step
                    if i == len(variants) - 1:  # ours timed: a run cut in the bare LM's or peer's timing keeps it
                        print_json("generate.partial", {**header, **row})
                for impl in impls[1:]:  # other prefill cross-attention implementations, ours only
                    ttft, per_step = timed_steps(lambda clock: ours_gen(new, clock, impl), args.device, args.repeats)
                    row[f"ours_ttft_ms_{impl}"] = ttft * 1e3
            for name in variants:
                prefix = _prefix(name)
                row[f"{prefix}decode_time_vs_bare_lm"] = row["bare_lm_decode_tok_s"] / row[f"{name}_decode_tok_s"]
                if not args.skip_peer:
                    row[f"{prefix}decode_vs_{peer_name}"] = (row[f"{name}_decode_tok_s"]
                                                             / row[f"{peer_name}_decode_tok_s"])
                    row[f"{prefix}ttft_vs_{peer_name}"] = row[f"{peer_name}_ttft_ms"] / row[f"{name}_ttft_ms"]
            rows.append(row)
            print_json("generate", {**header, **row})
    return rows


def _prefix(variant: str) -> str:
    """The column prefix of a variant's tokens check and ratios: none for `ours` (today's names), else `{name}_`."""
    return "" if variant == "ours" else variant + "_"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="cpu", choices=["tiny", "cpu", "gpu"])
    parser.add_argument("--lm", default="llama", choices=LM_FAMILIES, help="the LM family at the shape's size")
    parser.add_argument("--peer", default="openflamingo", choices=PEERS,
                        help="OpenFlamingo 2.0.1, OpenFlamingo v1 (0.0.2) or Multimodal-GPT (0.0.1; ours timed with "
                             "the LM's adapters kept and merged)")
    parser.add_argument("--shots", type=int, nargs="+", default=[4, 8, 32])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--xattn-every", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPE_NAMES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", default="dynamic", choices=["dynamic", "static"],
                        help="LM KV cache for ours and the bare LM; static lets HF compile the decode step (GPU)")
    parser.add_argument("--compile", action="store_true",
                        help="static cache + compiled decode step (CUDA graphs on GPU) for ours and the bare LM, on "
                             "any device; the warm-up run compiles")
    parser.add_argument("--skip-peer", action="store_true", help="time only ours and the bare LM")
    parser.add_argument("--xattn-impl", nargs="+", default=["auto"],
                        choices=["auto", "reference", "segments", "flex", "gather"],
                        help="prefill cross-attention implementation(s): the first gives the main row, each other adds "
                             "an ours_ttft_ms_<impl> column")
    args = parse_args(parser)
    print(f"# bench.generate on {machine()}, shape={args.shape}, lm={args.lm}, peer={args.peer}, dtype={args.dtype}, "
          f"xattn_every={args.xattn_every}")
    pair = build_pair(args.shape, xattn_every=args.xattn_every, device=args.device, dtype=torch_dtype(args.dtype),
                      lm=args.lm, peer=args.peer)
    rows = run(args, pair)
    peer, variants = args.peer, ["ours"] + (["ours_merged"] if pair.ours_merged is not None else [])
    print_table(rows, ["shots", "batch", "ctx_tokens"]
                + [f"{_prefix(v)}{c}" for v in variants for c in ("same_tokens_as_peer", "near_tie")]
                + [f"{m}_ttft_ms" for m in variants + [peer, "bare_lm"]]
                + [f"{m}_decode_tok_s" for m in variants + [peer, "bare_lm"]]
                + [f"{_prefix(v)}{c}" for v in variants
                   for c in (f"decode_vs_{peer}", "decode_time_vs_bare_lm", f"ttft_vs_{peer}")]
                + [f"ours_ttft_ms_{impl}" for impl in args.xattn_impl[1:]])


if __name__ == "__main__":
    main()
