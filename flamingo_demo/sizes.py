"""Size presets of the mini world and its backbones: `binding` (what `flamingo demo` runs: an LM able to bind words
in context), `fast` (the same without binding) and `smoke` (the test suite); `MINUTES` says how long each takes.

Each value was chosen by measuring on 2 CPU cores; docs/demo.md keeps the measurements (what was tried, on which
seeds, what it gave, and what was not kept).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class MiniSize:
    name: str
    image_size: int = 32  # stills; the vision tower sees this size
    video_frames: int = 6
    video_fps: float = 1.0  # one frame a second: a 1-FPS reader gets every frame
    video_scale: int = 2  # videos are written at image_size * video_scale so that yuv420p keeps the colours
    # Training data.
    pairs: int = 12000  # also the vision tower's pretraining set: fewer overfit (shape accuracy drops)
    docs: int = 1500  # interleaved MMC4-style documents
    binding_fraction: float = 0.2  # share of documents that are concept-binding episodes
    quiz_fraction: float = 0.35  # share of documents that are quiz pages (questions about each image, short answers)
    video_qa_fraction: float = 0.7  # share of video-text pairs whose text is a question and its short answer
    prompted_caption_fraction: float = 0.3  # prompted pairs written `Output:{caption}` (the rest: questions)
    videos: int = 400
    multi_docs: int = 4000  # multi-image pairs (2-3 images, a question naming one or two by reference)
    multi_plain_fraction: float = 0.2  # share of them naming the images in words (`image 0`), as plain prompts do
    # Evaluation sets: (demo pool = train split, evaluated = test split), all on held-out images.
    vqa: tuple[int, int] = (200, 400)
    captioning: tuple[int, int] = (100, 200)
    classification: tuple[int, int] = (120, 240)
    videoqa: tuple[int, int] = (60, 150)
    multi_image: tuple[int, int] = (120, 240)
    binding_episodes: int = 150  # one query each, with its own demos in the train split
    binding_shots: int = 8  # an episode's demos: this many per word (n-way k-shot, k counted per word as in Frozen)
    novel_prob: float = 0.25  # share of evaluation scenes on a held-out (kind, colour) combination
    # Text corpus for the LM (one document per line) and its held-out part for perplexity.
    corpus_docs: int = 6000
    # Induction documents (texts.induction_documents), added to the LM corpus: 0 in `fast`, see `binding`.
    copy_docs: int = 0
    assoc_docs: int = 0
    heldout_docs: int = 300
    samples: int = 16  # sample images for the report
    # BPE tokenizer.
    vocab_size: int = 768
    # Vision tower (CLIPVisionModel) and its contrastive pretraining.
    vision_hidden: int = 96
    vision_layers: int = 2  # 2 layers x 700 steps beat 3 layers x 600 steps in the same time
    vision_heads: int = 4
    patch_size: int = 4  # 64 patches at 32 px; patch 8 (16 patches) learned positions and shapes far worse
    embed_dim: int = 64  # joint image-text embedding width
    # 1000 steps: shape, the slowest attribute, was the Flamingo's weakest VQA type at 620 (docs/demo.md).
    vision_steps: int = 1000
    vision_batch: int = 64
    vision_lr: float = 4e-3
    vision_aux: float = 1.0  # weight of the auxiliary attribute classifiers (labels read off the captions)
    # Shape is the slowest attribute to learn: its classifier counts 6x (the weights tried: docs/demo.md).
    vision_kind_weight: float = 6.0
    # 4x helped video QA on one seed but cost VQA and classification: not kept.
    vision_position_weight: float = 1.0
    # Two options for a tower that Flamingo can read, on in `binding` (measurements in docs/demo.md).
    # `vision_mean_aux`: the attribute classifiers also read the mean of the patches (weight), not only their max:
    # Flamingo reads patches by attention, i.e. by weighted means, and kind was far easier to decode from their max.
    # `vision_recolour`: that share of every batch has its RGB channels permuted, drops its colour label and sits
    # out the contrastive loss, so kind stops depending on colour. Caveat: a permuted image can look like a held-out
    # (kind, colour) combination, so the tower may see shapes in such colours, never with a colour word.
    vision_mean_aux: float = 0.0
    vision_recolour: float = 0.0
    vision_sincos: float = 0.2  # scale of the 2-D sin-cos init of the position embeddings (0: HF's random init)
    retrieval_pairs: int = 500  # held-out pairs for image->text retrieval accuracy
    # Causal LM (LlamaForCausalLM).
    lm_hidden: int = 128
    lm_layers: int = 4
    lm_heads: int = 4
    lm_intermediate: int = 384
    lm_context: int = 256
    # 220 steps fit the world's text but leave in-context recall at chance; induction heads need `binding`'s LM.
    lm_steps: int = 220
    lm_batch: int = 8
    lm_lr: float = 3e-3
    # "cosine" (warmup, then down to 10%) or "constant" (warmup, then the peak to the end; see `binding`)
    lm_schedule: str = "cosine"
    # Stop early once the LM has induction heads: every `lm_probe_every` steps (0: never) probe its in-context recall
    # (`assoc_recall` on fresh words the corpus never uses); from the first probe at >= `lm_induction_recall`, train
    # `lm_steps_after_induction` more steps, then stop (`lm_steps` stays the most). The probes read the LM without
    # changing it or any random state, so an early-stopped LM is the same bits as the longer run at that step.
    lm_probe_every: int = 0
    lm_induction_recall: float = 0.9
    lm_steps_after_induction: int = 200
    # Flamingo stage (read by demo.py): optimizer steps of configs/mini.yaml. Fewer lose VQA points (docs/demo.md).
    flamingo_steps: int = 1100
    flamingo_gate_type: str = "scalar"  # FlamingoConfig.gate_type of the Flamingo stage (see `binding`)
    eval_samples: int = 80  # evaluated test samples per task and number of shots (binding: all its episodes)

    def replace(self, **changes) -> "MiniSize":
        return dataclasses.replace(self, **changes)


SIZES: dict[str, MiniSize] = {
    "smoke": MiniSize(
        name="smoke", video_frames=4, pairs=1500, docs=300, videos=60, vqa=(20, 30), captioning=(10, 40),
        classification=(16, 24), videoqa=(8, 12), multi_docs=200, multi_image=(12, 16), binding_episodes=8,
        corpus_docs=400, heldout_docs=40, samples=4,
        vocab_size=400, vision_hidden=64, vision_layers=2, vision_steps=150, vision_batch=32, retrieval_pairs=100,
        lm_hidden=64, lm_layers=2, lm_intermediate=128, lm_context=128, lm_steps=200, lm_batch=8,
        lm_probe_every=50,  # exercises the early-stop probes (its LM never passes them: all 200 steps)
        # 240 steps and 40 test captions keep test_demo's check (4-shot CIDEr, trained vs gates 0) well apart in
        # its time; its prompted pairs are all `Output:` captions (too few steps to learn that the prompt prefix
        # picks question or caption); docs/demo.md has the numbers.
        flamingo_steps=240, eval_samples=40,
        prompted_caption_fraction=1.0),
    "fast": MiniSize(name="fast"),
    # `fast` with an LM that has induction heads, which the binding task needs (docs/demo.md has every run):
    # - the LM trains on the world's text plus 9000 copy and 6000 association documents
    #   (texts.induction_documents) at a constant lr 6e-3, up to 1100 steps: its induction heads form
    #   abruptly, part way through (docs/demo.md);
    # - the tower trains 1500 steps with `vision_mean_aux` and `vision_recolour` (above);
    # - the Flamingo stage has one tanh gate per LM channel (`gate_type: vector`): with scalar gates binding
    #   depended on the Flamingo stage's random seed.
    # Its LM is probed every 100 steps, so the report says when its induction heads formed, but always trains all
    # 1100 steps: stopping soon after the first passing probe bound words less well (docs/demo.md).
    "binding": MiniSize(name="binding", copy_docs=9000, assoc_docs=6000, lm_steps=1100, lm_lr=6e-3,
                        lm_schedule="constant", lm_probe_every=100, lm_steps_after_induction=1100,
                        vision_steps=1500, vision_mean_aux=1.0, vision_recolour=0.5, flamingo_gate_type="vector"),
}


# What `flamingo demo` runs: the size that shows the binding task (the `fast` LM cannot copy from its context).
DEFAULT_SIZE = "binding"

# How long `flamingo demo --size S` takes from scratch on 2 CPU cores, (fewest, most) minutes over the runs in
# docs/demo.md. The CLI's help reads it; the README and docs cite it.
MINUTES: dict[str, tuple[int, int]] = {"binding": (14, 23), "fast": (11, 16), "smoke": (2, 2)}


def duration(size: str) -> str:
    """`~16-23 minutes` for a size, from `MINUTES`."""
    low, high = MINUTES[size]
    return f"~{low} minutes" if low == high else f"~{low}-{high} minutes"


def get_size(name: str) -> MiniSize:
    if name not in SIZES:
        raise ValueError(f"unknown mini-world size {name!r}; choose from {sorted(SIZES)}")
    return SIZES[name]
