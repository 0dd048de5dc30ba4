"""Cross-attention forward + backward under the masking rule, by implementation, vs OpenFlamingo's masked einsum.

    python -m bench.xattn --device cuda --dtype bf16        # T=2048 text tokens, 4/8/32 images of 64 latents

Every implementation computes the same function (tests check them against each other); this measures cost. The
OpenFlamingo row is its `MaskedCrossAttention` (eager einsum over all N·R keys with a dense mask), with the same
weights. `varlen` is PyTorch's variable-length attention where this torch has it (query segments = text runs,
key segments = their image's latents).
"""

from __future__ import annotations

import argparse
import copy
from typing import Any, Callable

import torch

from bench.common import machine, parse_args, print_json, print_table, timed
from flamingo.model.xattn import MaskedCrossAttention, compute_media_index, flex_block_mask
from flamingo.peers.openflamingo import load_openflamingo_modules
from flamingo.runtime import DTYPE_NAMES, torch_dtype

MEDIA = 1


def _varlen_fn() -> Callable[..., Any] | None:
    try:
        from torch.nn.attention.varlen import varlen_attn  # torch >= 2.9, CUDA only
    except ImportError:
        return None
    return varlen_attn


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    dtype = torch_dtype(args.dtype)
    dev = args.device
    rows = []
    for n in args.images:
        torch.manual_seed(0)
        ids = torch.full((args.batch, args.tokens), 5, device=dev)
        positions = torch.linspace(0, args.tokens - 8, n).long()
        ids[:, positions] = MEDIA  # evenly spaced images; the first text tokens see no image
        media_index = compute_media_index(ids, MEDIA)
        ours = MaskedCrossAttention(dim=args.dim, dim_visual=args.dim_visual, heads=8, head_dim=64,
                                    only_attend_last_image=True).to(dev, dtype)
        of = load_openflamingo_modules()
        peer = of.GatedCrossAttentionBlock(dim=args.dim, dim_visual=args.dim_visual).attn.to(dev, dtype)
        peer.load_state_dict(ours.state_dict())
        x = torch.randn(args.batch, args.tokens, args.dim, device=dev, dtype=dtype, requires_grad=True)
        visual = torch.randn(args.batch, n, 64, args.dim_visual, device=dev, dtype=dtype, requires_grad=True)

        def step(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
            def go() -> None:
                out = fn()
                out.float().sum().backward()
            return go

        impls: dict[str, Callable[[], torch.Tensor]] = {
            "openflamingo_einsum": lambda: peer(x, visual, media_locations=ids == MEDIA),
        }
        # as in the model: the flex block mask is built once per batch (the hooks) and shared by all layers
        mask = flex_block_mask(media_index, n, 64, True) if "flex" in args.impls else None
        for impl in args.impls:
            impls[impl] = (lambda impl=impl: ours(x, ours.project_media(visual), media_index, impl,
                                                  mask if impl == "flex" else None))
        row: dict[str, Any] = {"images": n, "tokens": args.tokens, "batch": args.batch}
        exact = _float64_reference(ours, x, visual, media_index)  # correct first: every output against float64
        for name, fn in impls.items():
            try:
                with torch.no_grad():
                    row[f"{name}_rel_err"] = _rel_err(fn(), exact)
            except Exception as e:
                row[f"{name}_rel_err"] = None
                print(f"# {name} failed at {n} images: {type(e).__name__}: {e}")
            try:
                row[f"{name}_ms"] = timed(step(fn), dev, args.repeats, warmup=2) * 1e3
            except Exception as e:  # an implementation this torch/device lacks
                row[f"{name}_ms"] = None
                print(f"# {name} failed at {n} images: {type(e).__name__}: {e}")
        varlen = _varlen_fn()
        if varlen is not None and dev.startswith("cuda"):
            row["varlen_ms"], row["varlen_rel_err"] = _time_varlen(varlen, ours, x, visual, media_index, exact, dev,
                                                                   args.repeats)
        best = min(v for k, v in row.items() if k.endswith("_ms") and k != "openflamingo_einsum_ms" and v)
        row["speedup_vs_openflamingo"] = row["openflamingo_einsum_ms"] / best
        if row.get("varlen_ms"):
            row["flex_vs_varlen"] = (row.get("flex_ms") or float("nan")) / row["varlen_ms"]
        rows.append(row)
        print_json("xattn", {"device": machine(), "dtype": args.dtype, **row})
    return rows


def _float64_reference(module: MaskedCrossAttention, x: torch.Tensor, visual: torch.Tensor,
                       media_index: torch.Tensor) -> torch.Tensor:
    """The reference path on a float64 copy of the module and inputs: (B, T, D)."""
    ref = copy.deepcopy(module).double()
    with torch.no_grad():
        return ref(x.double(), ref.project_media(visual.double()), media_index, "reference")


def _rel_err(out: torch.Tensor, exact: torch.Tensor) -> float:
    return ((out.double() - exact).norm() / exact.norm()).item()


def _time_varlen(varlen: Callable[..., Any], module: MaskedCrossAttention, x: torch.Tensor, visual: torch.Tensor,
                 media_index: torch.Tensor, exact: torch.Tensor, dev: str,
                 repeats: int) -> tuple[float | None, float | None]:
    """Query segments = runs of tokens with the same image (text before any image is left out: its output is 0).
    Returns (ms per forward + backward, relative error of the kept rows against the float64 reference)."""
    b, t, _ = x.shape
    n = visual.shape[1]
    keep = (media_index > 0).flatten()
    image = (torch.arange(b, device=dev)[:, None] * n + media_index - 1).flatten()[keep]
    counts = torch.bincount(image, minlength=b * n)
    cu_q = torch.zeros(b * n + 1, dtype=torch.int32, device=dev)
    cu_q[1:] = counts.cumsum(0)
    cu_k = torch.arange(0, (b * n + 1) * 64, 64, dtype=torch.int32, device=dev)
    max_q = int(counts.max())

    def forward() -> torch.Tensor:
        q = module.to_q(module.norm(x)).flatten(0, 1)[keep].unflatten(-1, (8, 64))  # (M, h, d)
        kv = module.project_media(visual)
        k, v = kv.k.flatten(0, 2), kv.v.flatten(0, 2)  # (B·N·R, h, d)
        return module.to_out(varlen(q, k, v, cu_q, cu_k, max_q, 64).flatten(1))  # (M, D)

    def go() -> None:
        forward().float().sum().backward()

    try:
        with torch.no_grad():
            err = _rel_err(forward(), exact.flatten(0, 1)[keep])
        return timed(go, dev, repeats, warmup=2) * 1e3, err
    except Exception as e:
        print(f"# varlen failed: {type(e).__name__}: {e}")
        return None, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[4, 8, 32])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--dim-visual", type=int, default=1024)
    parser.add_argument("--impls", nargs="+", default=["reference", "segments", "flex"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bf16" if torch.cuda.is_available() else "fp32", choices=sorted(DTYPE_NAMES))
    parser.add_argument("--repeats", type=int, default=10)
    args = parse_args(parser)
    print(f"# bench.xattn on {machine()}, dtype={args.dtype}")
    rows = run(args)
    cols = ["images", "tokens", "openflamingo_einsum_ms"] + [f"{i}_ms" for i in args.impls] + ["varlen_ms",
                                                                                                "speedup_vs_openflamingo",
                                                                                                "flex_vs_varlen"]
    cols += [c for c in rows[0] if c.endswith("_rel_err")]
    print_table(rows, cols)


if __name__ == "__main__":
    main()
