"""Draw docs/architecture.png, the README's picture of the model: `python docs/figures/architecture.py`."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

FROZEN, TRAINED, DATA = "#d6e6f5", "#f9d7a6", "#eeeeee"
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "architecture.png")


def box(ax, x, y, w, h, text, color, size=10, weight="normal"):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08", fc=color, ec="#444444",
                                lw=1.0))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size, weight=weight)


def arrow(ax, start, end, color="#444444", style="-|>", rad=0.0):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=12, color=color, lw=1.2,
                                 connectionstyle=f"arc3,rad={rad}"))


SEES = {1: "#ffe08a", 2: "#c9bdf0", 0: "#ffffff"}  # which image a token's cross-attention reads (0: none)


def mask_rule(ax, x, y, w, h):
    """The masking rule, drawn on two interleaved chunks: each token coloured by the one image it attends to."""
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08", fc="#ffffff",
                                ec="#444444", lw=1.0))
    ax.text(x + w / 2, y + h - 0.32, "masking: each text token attends only\nto the last <image> at or before it",
            ha="center", va="center", fontsize=8.5)
    rows = [[("Hi.", 0), ("<image>", 1), ("A", 1), ("cat.", 1)],
            [("<|endofchunk|>", 1), ("<image>", 2), ("A", 2), ("dog.", 2)]]
    for r, tokens in enumerate(rows):
        tx, ty = x + 0.12, y + h - 0.95 - r * 0.42
        for text, image in tokens:
            tw = 0.056 * len(text) + 0.14
            ax.add_patch(FancyBboxPatch((tx, ty), tw, 0.26, boxstyle="round,pad=0.01,rounding_size=0.04",
                                        fc=SEES[image], ec="#666666", lw=0.6))
            ax.text(tx + tw / 2, ty + 0.13, text, ha="center", va="center", fontsize=7)
            tx += tw + 0.04
    for i, (label, image) in enumerate([("sees image 1", 1), ("sees image 2", 2), ("sees none", 0)]):
        lx, ly = x + 0.12, y + 0.62 - i * 0.2
        ax.add_patch(FancyBboxPatch((lx, ly), 0.16, 0.12, boxstyle="square,pad=0", fc=SEES[image], ec="#666666",
                                    lw=0.6))
        ax.text(lx + 0.24, ly + 0.06, label, ha="left", va="center", fontsize=7.5)


def main() -> None:
    fig, ax = plt.subplots(figsize=(11, 6.2))
    ax.set_xlim(0, 11)
    ax.set_ylim(0, 6.2)
    ax.axis("off")

    # vision side
    box(ax, 0.3, 0.35, 2.6, 0.7, "images, or video\nframes at 1 FPS", DATA)
    box(ax, 0.3, 1.55, 2.6, 0.8, "vision encoder\n(any HF tower, frozen)", FROZEN)
    box(ax, 0.3, 2.85, 2.6, 0.95, "Perceiver Resampler\n+ time embedding per frame\n(trained)", TRAINED)
    box(ax, 0.3, 4.3, 2.6, 0.7, "R visual tokens\nper image", DATA)
    arrow(ax, (1.6, 1.05), (1.6, 1.55))
    arrow(ax, (1.6, 2.35), (1.6, 2.85))
    arrow(ax, (1.6, 3.8), (1.6, 4.3))

    # language side: blocks interleaved with the frozen LM's layers
    x0, w = 4.6, 3.2
    box(ax, x0, 0.35, w, 0.7, "<image> A cat.<|endofchunk|>\n<image> A dog ...", DATA, size=9)
    box(ax, x0, 1.3, w, 0.5, "token embeddings (frozen)", FROZEN, size=9)
    rows = [(1.95, "GATED XATTN-DENSE", TRAINED), (2.6, "LM layer (frozen)", FROZEN),
            (3.25, "GATED XATTN-DENSE", TRAINED), (3.9, "LM layer (frozen)", FROZEN)]
    for y, text, color in rows:
        box(ax, x0, y, w, 0.5, text, color, size=9, weight="bold" if color == TRAINED else "normal")
    ax.text(x0 + w / 2, 4.62, "...  a block before every N-th layer  ...", ha="center", va="center", fontsize=8.5,
            style="italic")
    box(ax, x0, 4.95, w, 0.5, "next-token logits", DATA, size=9)
    arrow(ax, (x0 + w / 2, 1.05), (x0 + w / 2, 1.3))
    for y in (1.8, 2.45, 3.1, 3.75):
        arrow(ax, (x0 + w / 2, y), (x0 + w / 2, y + 0.15))
    arrow(ax, (x0 + w / 2, 4.4), (x0 + w / 2, 4.5), style="-")
    arrow(ax, (x0 + w / 2, 4.75), (x0 + w / 2, 4.95))
    # visual tokens feed every block
    for y in (2.2, 3.5):
        arrow(ax, (2.9, 4.65), (x0, y), color="#b5651d", rad=0.15)

    # the block and the rule
    box(ax, 8.25, 2.9, 2.55, 1.75,
        "x += tanh(a) · xattn(x, visual)\nx += tanh(b) · ffw(x)\n\na = b = 0 at init:\nthe LM is intact", TRAINED,
        size=9)
    arrow(ax, (8.25, 3.7), (x0 + w, 3.5), color="#b5651d", style="-", rad=0.0)
    mask_rule(ax, 8.25, 0.35, 2.55, 2.2)
    ax.text(5.5, 6.0, "Flamingo: a frozen vision encoder and a frozen causal LM, bridged by trained modules",
            ha="center", va="center", fontsize=11, weight="bold")
    ax.text(0.3, 5.55, "frozen", fontsize=9, bbox=dict(fc=FROZEN, ec="#444444", boxstyle="round"))
    ax.text(1.2, 5.55, "trained", fontsize=9, bbox=dict(fc=TRAINED, ec="#444444", boxstyle="round"))
    ax.text(2.15, 5.55, "inputs and outputs", fontsize=9, bbox=dict(fc=DATA, ec="#444444", boxstyle="round"))
    fig.tight_layout()
    fig.savefig(OUT, dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    main()
