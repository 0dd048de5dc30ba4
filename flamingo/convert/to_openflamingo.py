"""Our model -> an OpenFlamingo 2.x `checkpoint.pt`: the inverse of `convert_openflamingo`, so that a model trained
here runs in OpenFlamingo's code (its evaluation suite, its demos) on the same backbones. A model with OpenFlamingo
v1's rule (`attend_next_image`: a converted v1 or Med-Flamingo checkpoint, fine-tuned here) is written the same way
for v1's code (open_flamingo 0.0.x, whose modules and names are 2.x's); the recipe names the version.

OpenFlamingo's `checkpoint.pt` holds the trained tensors under its module names: `perceiver.*`,
`lang_encoder.gated_cross_attn_layers.{L}.*`, and the LM's whole input embedding (OpenFlamingo trains it; its rows
are the LM's tokenizer plus `<|endofchunk|>`, `<image>`, and `<PAD>` when the tokenizer had no pad token, in that
order, which is ours). OpenFlamingo loads it with `model.load_state_dict(torch.load(path), strict=False)`.
Two of our tensors have no place in what `create_model_and_transforms` builds, so they are written under the names
OpenFlamingo's modules give them when asked for them, and `openflamingo_recipe` says how:
- the resampler's time embeddings (`perceiver.frame_embs`; OpenFlamingo adds them when its resampler is built with
  `max_num_frames`, which its factory never passes);
- an untied output head's added rows (the head's whole table, and its bias when it has one, Phi's; OpenFlamingo
  leaves those rows at their resize init).
What OpenFlamingo cannot compute is refused with the reasons (`incompatibilities`): another resampler or block,
vector gates, sizes its factory does not build, attention to every earlier image, image references, blocks skipped
on rows without images, added tokens other than its factory's, another layer rule, a trained or adapted LM or
tower, other vision features.

An earlier export is told by its recipe, which names its writer (`WRITTEN_BY`): a `checkpoint.pt` alone has the
layout of every published OpenFlamingo checkpoint, which an export never replaces.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch

from ..config import FlamingoConfig
from ..model.flamingo import Flamingo
from ..model.lora import has_lora
from ..processing import FlamingoProcessor, load_tokenizer
from ..runtime.hub import METADATA, is_hub_name
from .openflamingo import CLIP_VIT_L, OF_HEAD_DIM, module_names, param_name

# What `create_model_and_transforms` builds, whatever the checkpoint: PerceiverResampler(dim) and
# GatedCrossAttentionBlock(dim, dim_visual) with their defaults (latents, depth, heads, head width; xattn heads, head
# width; FFW multiple)
OF_FACTORY_SHAPES = (64, 6, 8, OF_HEAD_DIM, 8, OF_HEAD_DIM, 4)
# HF vision towers -> the open_clip (model, pretrained) names OpenFlamingo's factory takes for the same weights
OPEN_CLIP_NAMES = {CLIP_VIT_L: ("ViT-L-14", "openai")}


def incompatibilities(model: Flamingo, processor: Optional[FlamingoProcessor] = None) -> list[str]:
    """What OpenFlamingo 2.x cannot compute of this model (empty: it exports exactly); `processor`, when given, names
    an added token OpenFlamingo has no row for by its text."""
    c = model.config
    found = []
    if c.resampler != "perceiver" or c.resampler_qk_norm or c.resampler_ffw_act != "gelu":
        found.append("a resampler other than OpenFlamingo's Perceiver (no q/k norms, GELU)")
    if c.block != "flamingo":
        found.append(f"{c.block!r} cross-attention blocks")
    if not c.gated or c.gate_type != "scalar":
        found.append("gates other than one tanh scalar per branch")
    built = (c.num_latents, c.resampler_depth, c.resampler_heads, c.resampler_head_dim, c.xattn_heads,
             c.xattn_head_dim, c.ffw_mult)
    if built != OF_FACTORY_SHAPES:
        found.append("resampler / block sizes (latents, depth, heads, head width; xattn heads, head width; FFW "
                     f"multiple) {built}, not the {OF_FACTORY_SHAPES} OpenFlamingo's factory builds")
    if not c.only_attend_last_image:
        found.append("attention to every earlier image (OpenFlamingo's tokens see the last one)")
    if c.num_image_references:
        found.append("image reference tokens")
    if c.imageless_rows_skip_blocks:
        found.append("blocks skipped on rows without images (imageless_rows_skip_blocks; OpenFlamingo runs them on "
                     "every row)")
    tokens = added_tokens_problem(c, processor.tokenizer if processor is not None else None)
    if tokens:
        found.append(tokens)
    layers = len(model.lm.get_submodule(model.decoder_layers_path))
    if model.xattn_layer_indices != [i for i in range(layers) if (i + 1) % c.xattn_every == 0]:
        found.append(f"blocks before layers {model.xattn_layer_indices}, not every {c.xattn_every}th")
    if c.vision_feature_layer != -1 or not c.drop_cls_token:
        found.append("vision features other than the tower's last hidden state without its CLS token")
    tables = {"lm." + param_name(model.lm, m.weight)
              for m in (model.lm.get_input_embeddings(), model.lm.get_output_embeddings()) if m is not None}
    changed = [n for n in c.extra_saved_weights if n.startswith("lm.") and n not in tables]  # a merged LoRA, say
    if has_lora(model.lm) or not c.freeze_lm or changed:
        found.append("a trained or adapted LM (OpenFlamingo's checkpoint holds no LM weights but its embedding)"
                     + (f": changed LM weights {changed[:3]}" if changed else ""))
    if not c.freeze_vision:
        found.append("a trained vision tower")
    return found


def added_tokens_problem(c: FlamingoConfig, tokenizer: Any = None) -> Optional[str]:
    """Why the model's added vocabulary rows are not those OpenFlamingo's factory adds, or None. The factory adds
    `<|endofchunk|>`, `<image>`, then `<PAD>` when the tokenizer has no pad token, in that order, and builds a table
    of exactly those rows; a family's own markers (Otter's `<answer>`) have no row there, and the file would not load
    (its table has other rows) or would give `<PAD>` another id. Image reference tokens are refused on their own.
    A config saved before the pad id was recorded (`pad_token_id` None) is read as OpenFlamingo's layout. A row the
    config names no token for is named by its text in `tokenizer` (with its id), else by its id alone."""
    first, n = c.first_new_token_id, c.num_new_tokens - c.num_image_references
    if not n or first is None:
        return None
    layout = {first: c.end_of_chunk_token_id, first + 1: c.media_token_id}  # row -> the id it must hold
    if n == 3:
        layout[first + 2] = first + 2 if c.pad_token_id is None else c.pad_token_id
    if n in (2, 3) and all(row == token for row, token in layout.items()) and \
            (n == 3 or c.pad_token_id is None or c.pad_token_id < first):
        return None
    known = {c.end_of_chunk_token_id: "<|endofchunk|>", c.media_token_id: "<image>", c.pad_token_id: "the pad token"}
    rows = [known.get(i) or _token_text(tokenizer, i) for i in range(first, first + n)]
    return (f"added tokens [{', '.join(rows)}] (ids {first} to {first + n - 1}), where OpenFlamingo's factory adds "
            "<|endofchunk|>, <image> and, when the tokenizer has no pad token, <PAD>: it builds no row for any other "
            "(a family's own marker, e.g. Otter's <answer>)")


def _token_text(tokenizer: Any, token_id: int) -> str:
    """Token `token_id` as a message names it: its text and id (`<answer> (id 50280)`), or its id alone."""
    text = tokenizer.convert_ids_to_tokens(token_id) if tokenizer is not None and token_id < len(tokenizer) else None
    return f"{text} (id {token_id})" if isinstance(text, str) else f"id {token_id}"


def openflamingo_state(model: Flamingo, processor: Optional[FlamingoProcessor] = None) -> dict[str, torch.Tensor]:
    """Our trained tensors under OpenFlamingo's names (see the module docstring). Raises ValueError listing what
    OpenFlamingo cannot compute (`processor`: to name tokens by their text)."""
    problems = incompatibilities(model, processor)
    if problems:
        raise ValueError("OpenFlamingo cannot represent this model: " + "; ".join(problems))
    c, ours = model.config, model.state_dict()
    state = {theirs: ours[mine] for theirs, mine in module_names(c.resampler_depth, model.xattn_layer_indices)}
    time = ours["resampler.time_embeddings"]
    if bool(time.any()):
        state["perceiver.frame_embs"] = time  # (F, D)

    first, n = c.first_new_token_id, c.num_new_tokens
    rows = first + n if n else model.lm.get_input_embeddings().num_embeddings  # OpenFlamingo cuts to its tokenizer
    embedding = model.lm.get_input_embeddings().weight
    table = embedding.detach()[:rows].clone()
    if n:
        table[first:] = model.new_token_embeddings.detach().to(table.dtype)
    state["lang_encoder." + param_name(model.lm, embedding)] = table
    head = model.lm.get_output_embeddings()
    if model.new_lm_head is not None:  # untied: the head's table (and bias, Phi's) with our trained added rows
        for param, added in ((head.weight, model.new_lm_head), (getattr(head, "bias", None), model.new_lm_head_bias)):
            if param is not None and added is not None:
                whole = param.detach()[:rows].clone()  # (rows, D) or (rows,)
                whole[first:] = added.detach().to(whole.dtype)
                state["lang_encoder." + param_name(model.lm, param)] = whole
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


# The recipe's LM when the model names none: a conversion that cut its LM's table (OpenFlamingo's published MPT and
# RedPajama LMs) or an in-memory LM. The user writes in the LM the model was converted from (docs/convert.md).
LM_UNNAMED = "<the hub name or path of the LM this model was converted from or built on: its config names none>"
WRITTEN_BY = "flamingo export open-flamingo"  # the recipe's `written_by`: what tells an earlier export


def lm_tokenizer_problem(c: FlamingoConfig) -> Optional[str]:
    """Why OpenFlamingo's factory, given the LM's own tokenizer (`lm_name_or_path`), would not build this model's
    embedding table, or None. The factory adds `<|endofchunk|>`, `<image>` and, without a pad token, `<PAD>` to the
    tokenizer it is given: the model's rows come out only from a tokenizer of `first_new_token_id` tokens with the pad
    token the model was converted with (a model converted with another one, `flamingo convert ... --tokenizer`,
    e.g. Med-Flamingo's, may differ from its LM's in size or pad token). None too when that tokenizer cannot be read
    here: a Hub LM's is read from the local Hub cache alone, at its recorded commit (an export downloads nothing)."""
    first, n = c.first_new_token_id, c.num_new_tokens - c.num_image_references
    if not c.lm_name_or_path or first is None or not n:
        return None
    try:
        source = c.lm_name_or_path
        if is_hub_name(source) and not os.path.isdir(source):
            from huggingface_hub import snapshot_download

            source = snapshot_download(source, revision=c.lm_revision, allow_patterns=list(METADATA),
                                       local_files_only=True)
        tokenizer = load_tokenizer(source)
    except Exception:  # not here (not in the cache), no tokenizer files, or files no tokenizer class reads
        return None
    pad = tokenizer.pad_token_id
    if len(tokenizer) == first and (pad is None) == (n == 3) and (pad is None or c.pad_token_id in (None, pad)):
        return None
    theirs = f"pad token id {pad}" if pad is not None else "no pad token (the factory adds <PAD>)"
    ours = f"pad token id {c.pad_token_id}" if n == 2 else f"<PAD> added at id {first + 2}"
    return (f"the LM's tokenizer ({c.lm_name_or_path}) has {len(tokenizer)} tokens and {theirs}; this model's was "
            f"converted with {first} tokens and {ours}")


def openflamingo_recipe(model: Flamingo, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """How to build the OpenFlamingo model that loads `state`: `create_model_and_transforms` arguments (the LM's
    decoder layers named: the factory infers them for a few LM classes only), the Hub commits its backbones are
    pinned to (`revisions`: the factory takes no revision) and the additions its factory does not make. A backbone
    the model names no source for is a placeholder string saying what to fill in (`LM_UNNAMED`, `<the open_clip
    model of ...>`), never null; so is the tokenizer when the LM's own would not give the model's table
    (`lm_tokenizer_problem`)."""
    c = model.config
    vision = c.vision_name_or_path
    clip_name, pretrained = OPEN_CLIP_NAMES.get(vision or "", (None, None))
    tower = vision or "the vision tower this model was converted from or built on: its config names none"
    problem = lm_tokenizer_problem(c)
    tokenizer = (f"<the tokenizer this model was converted with (flamingo convert ... --tokenizer): {problem}>"
                 if problem else c.lm_name_or_path or LM_UNNAMED)
    recipe: dict[str, Any] = {
        "create_model_and_transforms": {
            "clip_vision_encoder_path": clip_name or f"<the open_clip model of {tower}>",
            "clip_vision_encoder_pretrained": pretrained or f"<the open_clip weights of {tower}>",
            "lang_encoder_path": c.lm_name_or_path or LM_UNNAMED, "tokenizer_path": tokenizer,
            "cross_attn_every_n_layers": c.xattn_every, "decoder_layers_attr_name": model.decoder_layers_path},
        "load": "model.load_state_dict(torch.load(path), strict=False)",
        # the code whose masking rule the model computes (module docstring of convert/openflamingo.py)
        "open_flamingo": "0.0.2 (v1: text sees the next image)" if c.attend_next_image else "2.x",
        "written_by": WRITTEN_BY,
    }
    # the Hub commits the backbones were read at (docs/architecture.md, "A Hub backbone is pinned to a commit"):
    # OpenFlamingo's factory takes names or paths, no revision, and reads a name's newest version
    pinned = {ref: rev for ref, rev in ((c.lm_name_or_path, c.lm_revision), (vision, c.vision_revision))
              if ref and rev and is_hub_name(ref)}
    if pinned:
        recipe["revisions"] = pinned
        recipe["revisions_note"] = (
            "the Hub commits of the backbones the model was built on: create_model_and_transforms reads a name's "
            "newest version, so download each at its commit first (huggingface_hub.snapshot_download(name, "
            "revision=commit)) and pass that directory as lang_encoder_path and tokenizer_path (the LM); open_clip "
            "reads the vision weights clip_vision_encoder_pretrained names")
    before = []
    if "perceiver.frame_embs" in state:
        frames, dim = state["perceiver.frame_embs"].shape
        before.append(f"model.perceiver.frame_embs = torch.nn.Parameter(torch.zeros({frames}, {dim}))")
    if before:
        recipe["before_load"] = before
    return recipe


def is_export_recipe(path: str) -> bool:
    """Whether `path` is the `.json` recipe of an earlier export: a JSON object naming this exporter as its writer
    (`WRITTEN_BY`)."""
    try:
        with open(path) as f:
            recipe = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(recipe, dict) and recipe.get("written_by") == WRITTEN_BY


def is_openflamingo_state_file(path: str) -> bool:
    """Whether the file `path` is a weights-only torch file of OpenFlamingo's trained tensors (`perceiver.latents`
    among them, every name under `perceiver.` or `lang_encoder.`): an export's layout, and every published
    OpenFlamingo checkpoint's."""
    try:  # mapped, not read
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # any file torch cannot read as a checkpoint of tensors is not ours
        return False
    return isinstance(state, dict) and "perceiver.latents" in state and \
        all(isinstance(k, str) and k.startswith(("perceiver.", "lang_encoder.")) for k in state)


def check_openflamingo_out(path: str) -> None:
    """Refuse an export path that is a directory, or names existing files that are not an earlier export: the
    checkpoint is one only beside its recipe (`is_export_recipe`; a published or user's `checkpoint.pt` has none),
    and a recipe only when it names this exporter. A missing parent directory is created when written."""
    recipe = path + ".json"
    for target in (path, recipe):
        if os.path.isdir(target):
            raise ValueError(f"{target!r} is a directory: the export is a file, e.g. "
                             f"{os.path.join(path, 'checkpoint.pt')!r}")
    ours = is_export_recipe(recipe)
    if os.path.exists(recipe) and not ours:
        raise ValueError(f"{recipe!r} exists and is not an earlier OpenFlamingo export's recipe: the export does not "
                         "overwrite it; choose another path")
    if os.path.exists(path) and not (ours and is_openflamingo_state_file(path)):
        raise ValueError(f"{path!r} exists and is not an earlier OpenFlamingo export (no recipe {recipe!r} written by "
                         f"`{WRITTEN_BY}` beside it; a downloaded or saved OpenFlamingo checkpoint has none): the "
                         "export does not overwrite it; choose another path (an export interrupted before its "
                         "recipe was written leaves such a file: remove it)")


def save_openflamingo_checkpoint(model: Flamingo, path: str, processor: Optional[FlamingoProcessor] = None
                                 ) -> dict[str, Any]:
    """Write `openflamingo_state(model)` to `path` (a torch file of tensors only: `torch.load(weights_only=True)` reads
    it) and `path` + `.json` with the recipe; `path` is new or an earlier export (`check_openflamingo_out`). Both are
    written whole beside their targets first; then the old recipe goes, the checkpoint is renamed into place and the
    recipe last, so an interrupted export leaves a checkpoint without its recipe, never beside another's. Returns the
    recipe. `processor`: the model's, to name a token OpenFlamingo has no row for by its text."""
    check_openflamingo_out(path)
    state = openflamingo_state(model, processor)
    recipe = openflamingo_recipe(model, state)
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp, tmp_recipe = f"{path}.tmp-{os.getpid()}", f"{path}.json.tmp-{os.getpid()}"
    try:
        torch.save(state, tmp)
        with open(tmp_recipe, "w") as f:
            json.dump(recipe, f, indent=2)
        if os.path.exists(path + ".json"):
            os.remove(path + ".json")
        os.replace(tmp, path)
        os.replace(tmp_recipe, path + ".json")
    finally:
        for left in (tmp, tmp_recipe):
            if os.path.exists(left):
                os.remove(left)
    return recipe
