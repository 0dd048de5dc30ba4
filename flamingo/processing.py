"""`FlamingoProcessor`: interleaved prompts (text with `<image>` placeholders + images / videos) <-> model inputs.

A prompt is either a string with one `<image>` per medium plus the list of media, or one list mixing strings and
media (`["Question:", img, "Answer: a cat.<|endofchunk|>"]`). A medium is a PIL image, an array `(H, W, 3)` of uint8
pixels, a video (a list of PIL frames, an array `(F, H, W, 3)`, a path to a video file, or an animated GIF, PNG or
WebP, as a path or a PIL image), a path to an image file, or pixel values already preprocessed (a float tensor
`(C, H, W)` or `(F, C, H, W)`). Every medium becomes a tensor `(F, C, H, W)` (F = 1 for a still); a batch becomes
`images (B, N_media, F, C, H, W)` zero-padded, with `num_media (B,)` and `num_frames (B, N_media)` saying what is
real.
"""

from __future__ import annotations

import functools
import json
import math
import numbers
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from tokenizers import Tokenizer, decoders, normalizers
from transformers import AutoImageProcessor, AutoTokenizer, BatchFeature, PreTrainedTokenizerBase
from transformers.utils import cached_file

from .config import END_OF_CHUNK_TOKEN, IDEFICS_IMAGE_WRAPPER, MEDIA_TOKEN, PROCESSOR_CONFIG_NAME
from .references import DECLARATION, reference_token, resolve_declarations
from .runtime.checkpoint_io import check_named
from .runtime.compat import TRANSFORMERS, keep_special_tokens_kwargs
from .runtime.hub import local_or_hub, metadata_dir
from .runtime.media_formats import open_image
from .runtime.text import valid_text
from .video import (  # noqa: F401 (MAX_ASPECT_RATIO re-exported)
    MAX_ASPECT_RATIO,
    TooLong,
    TooManyAnimationPixels,
    TooManyPixels,
    animation_timeline,
    check_image_size,
    composite_on_white,
    decode_video,
    uniform_frame_indices,
)

TEMPLATES = ("flamingo", "idefics", "otter", "mmgpt")
# Files read as videos (by PyAV) wherever a path comes in. Image files are read by PIL, an animated one (GIF, APNG,
# WebP) as a video (`image_frames`).
VIDEO_EXTENSIONS = (".mp4", ".m4v", ".webm", ".mkv", ".avi", ".mov", ".mpg", ".mpeg", ".3gp", ".flv", ".wmv")
_ANIMATABLE_MAGIC = (b"GIF87a", b"GIF89a", b"\x89PNG\r\n\x1a\n")
# under a reader's max_pixels, the frames an animation may decode, in images of that size (reading its timeline
# decodes every frame): 64 x 20 M pixels, some seconds of a CPU
ANIMATION_PIXELS = 64


def default_max_pixels() -> Optional[int]:
    """The most pixels an image or video frame read from a file may have (the processor's local files, training
    records' media), by its header before it is decoded, as the server's `--max-image-pixels` is: Pillow's
    decompression-bomb threshold (`PIL.Image.MAX_IMAGE_PIXELS`, 89 M by default: a 48 MP photo is read), read when
    a medium is. Set it higher, or to None, to read larger media."""
    return Image.MAX_IMAGE_PIXELS


def animatable_image(data: bytes) -> bool:
    """Whether a file's bytes are a GIF, PNG or WebP file (RIFF with "WEBP" at byte 8): read by PIL even where a video
    is expected (a `video` field, a `video_url` part, `video/gif`), an animation's frames by `image_frames`, as
    everywhere else. FFmpeg reads GIF and APNG on another clock and has no animated WebP."""
    return data.startswith(_ANIMATABLE_MAGIC) or (data.startswith(b"RIFF") and data[8:12] == b"WEBP")

Media = Union[Image.Image, Sequence[Image.Image], np.ndarray, torch.Tensor, str, Path]


def idefics_prompt(text: str, bos_token: Optional[str]) -> str:
    """IDEFICS's prompt format, as its processor writes it: BOS first, every `<image>` between
    `<fake_token_around_image>`s (consecutive images share one). Only a bare side of an `<image>` gets one, so a
    prompt already in that format is unchanged, two images each in their own pair too (IDEFICS writes them so with
    an empty text between them)."""
    runs = text.split(MEDIA_TOKEN)
    out = runs[0]
    for run in runs[1:]:
        if not out.endswith(IDEFICS_IMAGE_WRAPPER):
            out += IDEFICS_IMAGE_WRAPPER
        out += MEDIA_TOKEN + ("" if run.startswith(IDEFICS_IMAGE_WRAPPER) else IDEFICS_IMAGE_WRAPPER) + run
    if bos_token and not out.startswith(bos_token):
        out = bos_token + out
    return out


def idefics_list_text(prompt: Sequence[Any]) -> tuple[str, list]:
    """An interleaved list -> (its text, its media) as IDEFICS's processor writes one: text items stripped of their
    spaces, each image in `<fake_token_around_image>`s, where one right after an image shares its opening one (an
    image after a text item, even one left empty, opens its own)."""
    text, media, last_was_image = "", [], False
    for part in prompt:
        if isinstance(part, str):
            text += part.strip(" ")
            last_was_image = False
        else:
            text += ("" if last_was_image else IDEFICS_IMAGE_WRAPPER) + MEDIA_TOKEN + IDEFICS_IMAGE_WRAPPER
            media.append(part)
            last_was_image = True
    return text, media


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` in RGB as HF's image processors convert it (`convert_to_rgb`): transparency composited onto white. A
    plain `convert("RGB")` keeps the colour under transparent pixels, and the processor then sees no alpha.

    16-bit greyscale (modes `I;16*`, and `I` with values in 0..65535, as Pillow reads 16-bit PNG, TIFF and PGM
    files) keeps its high byte (`v >> 8`, as Pillow reduces 16-bit RGB), where a plain convert clips it to white.
    Floating-point images (mode `F`) and mode `I` values outside 0..65535 are refused: their range (0..1, 0..255,
    depth in metres, ...) is unknown. So are the sizes `check_image_size` refuses."""
    check_image_size(*image.size)
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image)
        if values.min() < 0 or values.max() > 65535:
            raise ValueError(f"{image.mode} image with values in {values.min()}..{values.max()}: only 16-bit values "
                             "(0..65535) have a known scale to 8 bits; convert it to 8-bit RGB first")
        image = Image.fromarray((values.astype(np.uint32) >> 8).astype(np.uint8), "L")
    elif image.mode == "F":
        raise ValueError("floating-point (mode F) image: its value range is unknown; convert it to 8-bit RGB first")
    if "A" not in image.getbands() and image.info.get("transparency") is None:
        return image.convert("RGB")
    return composite_on_white(image)


# One medium given where a list of media is expected: a path, a PIL image, an array or a tensor (an array or tensor
# with a frame axis is one video, not a list of images).
ONE_MEDIUM = (str, os.PathLike, Image.Image, np.ndarray, torch.Tensor)


def media_list(media: Any) -> list:
    """A prompt's media argument -> its list of media: None is none, a medium alone (`ONE_MEDIUM`) is a list of it."""
    if media is None:
        return []
    return [media] if isinstance(media, ONE_MEDIUM) else list(media)


def upright_rgb(image: Image.Image) -> Image.Image:
    """An image as HF's `load_image` and image processors see its file: turned upright by its EXIF orientation, then
    `to_rgb`. Every path media come in by (files, PIL images and frames given to the processor, the server's uploads,
    training shards) reads images through it, so a model sees an image the same way in training and in use. Its
    result carries no orientation, so reading it again leaves it as it is; an image rotated by hand (`rotate`,
    `transpose`) keeps the file's tag and is turned again: give such an image as `ImageOps.exif_transpose` left it."""
    return to_rgb(ImageOps.exif_transpose(image))


def image_frames(image: Image.Image, fps: float = 1.0, max_frames: int = 8, max_seconds: Optional[float] = None,
                 max_pixels: Optional[int] = None) -> list[Image.Image]:
    """An opened image file -> its frames: a still's one (`upright_rgb`), or an animation's (GIF, APNG, animated
    WebP) as a video's: the frame shown at each instant of `animation_timeline` (by the frames' own delays), each
    read by `upright_rgb`. What a file holds decides, not its name or MIME type: a GIF given as a path, a PIL image,
    a data URL or a training shard's member gives the same frames.

    Whatever else PIL reads as animated is played so: a multi-page TIFF's pages too, each shown 0.1 s (they carry no
    delay; at 1 FPS a 30-page TIFF gives pages 0, 10 and 20, where HF's `load_image` reads page 0: give
    `Image.open(path).convert("RGB")` for that). An MPO (a JPEG holding a second image: a stereo pair's other half,
    a phone camera's gain map) is a still photo: its first image only (`_first_image`), as viewers show it. An
    APNG's default image that is not part of its animation (a still for viewers without APNG) is not played:
    browsers and FFmpeg do not play it.
    Every frame's size is read on seeking to it, before it is decoded, and refused as `check_image_size` refuses
    an image, or over `max_pixels` (`TooManyPixels`): a TIFF's pages each have their own size. Reading the delays
    decodes no TIFF page: only WebP's and AVIF's delays need their frames decoded (GIF and APNG frames, each the
    canvas' size, are decoded by PIL's seek), and an animation of more frames x canvas than `ANIMATION_PIXELS`
    images of `max_pixels` is refused by its frame count (`TooManyAnimationPixels`, a `TooLong`). `max_seconds`:
    `TooLong` past it."""
    if image.format == "MPO":
        return [_first_image(image, max_pixels)]
    if not getattr(image, "is_animated", False):
        _check_frame(image, 0, max_pixels)
        return [upright_rgb(image)]
    shown = image.tell()  # a caller's image is left on the frame it showed
    first = 1 if image.format == "PNG" and image.info.get("default_image") else 0  # PIL's frame 0: the still

    def delays() -> Iterator[Optional[float]]:
        k = first
        while True:
            try:
                image.seek(k)
            except EOFError:
                return
            _check_frame(image, k, max_pixels)  # every frame, before any is decoded: the timeline reads them all
            if image.format in ("WEBP", "AVIF"):
                image.load()  # WebP's and AVIF's readers set a frame's delay when they decode it
            delay = image.info.get("duration")  # milliseconds
            yield float(delay) / 1000 if delay is not None else None
            k += 1

    if max_pixels is not None and image.format in ("GIF", "PNG", "WEBP", "AVIF"):
        # each frame is decoded whole (the canvas) to read its delay
        check_animation_pixels(image, max_pixels)
    try:
        frames = []
        for k in animation_timeline(delays(), fps, max_frames, max_seconds):  # ascending: each seek goes forward
            image.seek(first + k)
            frames.append(upright_rgb(image))
        return frames
    finally:
        image.seek(shown)


def check_animation_pixels(image: Image.Image, max_pixels: int) -> None:
    """An animation of more frames x canvas than `ANIMATION_PIXELS` images of `max_pixels` is refused by its frame
    count (a header's, or a scan of a GIF's blocks), before a frame is decoded (`TooManyAnimationPixels`): reading
    its timeline decodes every frame whole, and a small file of many frames on a large canvas costs minutes."""
    count, (width, height) = getattr(image, "n_frames", 1), image.size
    if count * width * height > ANIMATION_PIXELS * max_pixels:
        raise TooManyAnimationPixels(width, height, None, max_pixels, f"of {count} frames of {width}x{height} is "
                                     f"more than {ANIMATION_PIXELS} images of the {max_pixels} pixels allowed to "
                                     "decode")


def _first_image(image: Image.Image, max_pixels: Optional[int]) -> Image.Image:
    """A multi-image file's first image (`upright_rgb`), whatever frame a caller's image is on (it is left there):
    the others are not read, nor their sizes checked."""
    shown = image.tell()
    image.seek(0)
    try:
        _check_frame(image, 0, max_pixels)
        return upright_rgb(image)
    finally:
        image.seek(shown)


def _check_frame(image: Image.Image, index: int, max_pixels: Optional[int]) -> None:
    """The frame `image` is on, by its header size (nothing decoded): refused as `check_image_size` refuses an
    image, and over `max_pixels` (`TooManyPixels`, naming the frame's `index`)."""
    width, height = image.size
    check_image_size(width, height)
    if max_pixels is not None and width * height > max_pixels:
        raise TooManyPixels(width, height, index, max_pixels)
    # a tiled TIFF's decoder allocates a whole tile, whose size its header declares apart from the image's: a 16x16
    # image of one 32768x32768 compressed tile costs a GiB
    tags = getattr(image, "tag_v2", {})
    tile, limit = (tags.get(322), tags.get(323)), max_pixels or Image.MAX_IMAGE_PIXELS
    if all(isinstance(side, int) for side in tile) and limit and tile[0] * tile[1] > limit:
        raise TooManyPixels(tile[0], tile[1], index, limit)


def add_flamingo_tokens(tokenizer: PreTrainedTokenizerBase, num_references: int = 0,
                        extra_tokens: Sequence[str] = ()) -> list[int]:
    """Add `<|endofchunk|>`, `<image>` and `extra_tokens` (a model family's own markers, e.g. Otter's `<answer>`) in
    one call, then a pad token if missing, then `<image0>` ... for `num_references` reference tokens, to
    `tokenizer`; return the ids it added."""
    before = len(tokenizer)
    vocab = tokenizer.get_vocab()
    new = [t for t in (END_OF_CHUNK_TOKEN, MEDIA_TOKEN, *extra_tokens) if t not in vocab]
    if new:
        _add_special_tokens(tokenizer, new)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<PAD>"})
    vocab = tokenizer.get_vocab()
    references = [reference_token(k) for k in range(num_references) if reference_token(k) not in vocab]
    if references:
        _add_special_tokens(tokenizer, references)
    return list(range(before, len(tokenizer)))


def _add_special_tokens(tokenizer: PreTrainedTokenizerBase, new: list[str]) -> None:
    if new:
        tokenizer.add_special_tokens({"additional_special_tokens": new}, **keep_special_tokens_kwargs(tokenizer))


def appended_special_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """The special tokens `tokenizer` appends after every text it encodes with its special tokens: LLaMA's
    `add_eos_token` `</s>`, T5's `</s>`, BERT's `[SEP]`; () for most causal LMs' (BOS first, or nothing). A prompt is
    continued right after its text and a training sequence ends with the EOS its data writes, so the processor drops
    them (`FlamingoProcessor.token_ids`): a prompt ending with EOS would ask the model to write after its end."""
    plain = tokenizer("a", add_special_tokens=False, verbose=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True, verbose=False)["input_ids"]
    at = next((k for k in range(len(full) - len(plain) + 1) if full[k:k + len(plain)] == plain), None)
    return tuple(full[at + len(plain):]) if plain and at is not None else ()


def check_markers_whole(tokenizer: PreTrainedTokenizerBase, markers: Sequence[str]) -> None:
    """Refuse a tokenizer whose text does not read each of `markers` (`<image>`, ...) as its one token: one holding
    it as a plain entry of its vocabulary (not an added token), which its pre-tokenizer splits. No prompt could place
    an image, and every one would be refused with a count of `<image>`s that does not say why."""
    for marker in markers:
        ids = tokenizer(marker, add_special_tokens=False, split_special_tokens=False, verbose=False)["input_ids"]
        if ids != [tokenizer.convert_tokens_to_ids(marker)]:
            raise ValueError(f"the tokenizer holds {marker} (id {tokenizer.convert_tokens_to_ids(marker)}) as a plain "
                             f"entry of its vocabulary, not an added token: its text reads as "
                             f"{tokenizer.convert_ids_to_tokens(ids)}, so no prompt could hold it; pass the LM's own "
                             f"tokenizer, without {marker} (add_flamingo_tokens adds it as one token)")


def load_tokenizer(name_or_path: Union[str, os.PathLike]) -> PreTrainedTokenizerBase:
    """`AutoTokenizer.from_pretrained`, tokenizing as the directory's tokenizer.json says: every tokenizer flamingo
    loads (a processor, `from_backbones`, the converters) comes through here.

    A tokenizer.json whose normalizer prepends `▁` (LLaMA-1-era directories: OpenFlamingo v1, Med-Flamingo,
    Multimodal-GPT, IDEFICS, Otter-LLaMA) starts every text run with a word start, the runs after special tokens
    (`<image>`, `<|endofchunk|>`) too: what SentencePiece and transformers 4 gave those models in training.
    transformers 5's `LlamaTokenizer` rebuilds that pipeline (non-legacy unless the config says `legacy: true`, and
    then not quite the file's: `Metaspace` adds no `▁` before a run starting with a space), so the file's
    normalizer, pre-tokenizer and decoder are put back, and `legacy: true` is set so that the tokenizer saved with a
    processor keeps the choice. So for any `legacy: true` tokenizer read from a tokenizer.json (a `Metaspace` one:
    transformers 5 builds another, and saves it without `legacy`). A config's `legacy: false` does not change this,
    as in transformers 4, whose fast tokenizer read tokenizer.json as it is (docs/convert.md, "Tokenizers of
    LLaMA-1-era models").

    A LLaMA directory with a SentencePiece `tokenizer.model` and no tokenizer.json (early-2023 LLaMA-7B conversions)
    gets the legacy pipeline transformers 4 built from it unless its config says `legacy: false`, as transformers 4
    did (`legacy_llama_pipeline`); reading it needs sentencepiece and protobuf, and without them the error names
    them.

    A local directory holding no tokenizer files (`has_tokenizer_files`: a backbone saved by `save_pretrained`
    alone, a saved Flamingo's `lm/`) is a ValueError naming it and what to pass, not transformers' advice to install
    sentencepiece or tiktoken; a path that does not exist, or a file, is a FileNotFoundError naming it
    (`local_or_hub`), as a vision tower's or LM's is."""
    name = os.fspath(name_or_path)
    local_or_hub(name, "tokenizer")
    if os.path.isdir(name) and not has_tokenizer_files(name):
        raise ValueError(f"no tokenizer files in {name!r} (no tokenizer.json, tokenizer_config.json, vocabulary or "
                         "SentencePiece model): give the tokenizer's directory (model.tokenizer / --tokenizer), e.g. "
                         "the LM's original one; a Flamingo saved here goes whole as model.init_from / --model, not "
                         "its lm/ or vision/")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except Exception as e:
        missing = missing_sentencepiece_packages(name)
        if missing:
            raise ImportError(f"{name}: its tokenizer is a SentencePiece tokenizer.model without a tokenizer.json, "
                              f"which transformers reads with the {' and '.join(missing)} package"
                              f"{'s' if len(missing) > 1 else ''}: pip install 'flamingo-vlm[convert]' (or pip install "
                              f"{' '.join(missing)})") from e
        if os.path.isdir(name) and not tokenizer_file(name, "tokenizer.json") and tokenizer_file(name,
                                                                                               "tokenizer.model"):
            # both packages there but this pair cannot read the model (sentencepiece 0.2.3 with protobuf < 7.36.1):
            # transformers falls back to tiktoken, whose error names neither
            from importlib.metadata import version

            raise ValueError(f"cannot read the SentencePiece tokenizer.model in {name!r} with sentencepiece "
                             f"{version('sentencepiece')} and protobuf {version('protobuf')}: a damaged "
                             "file, or a pair that cannot read it (pip install -U 'flamingo-vlm[convert]' installs "
                             f"one that can): {type(e).__name__}: {' '.join(str(e).split())}") from e
        if os.path.isdir(name) and (type(e) is Exception or isinstance(e, (ValueError, KeyError, TypeError,
                                                                                  AttributeError))):
            # a damaged tokenizer.json / tokenizer_config.json: JSON's, UTF-8's, the tokenizers library's (a bare
            # Exception) or transformers' error names no file
            raise ValueError(f"cannot read the tokenizer in {name!r} (its tokenizer.json or tokenizer_config.json "
                             f"damaged?): {type(e).__name__}: {' '.join(str(e).split())}") from e
        raise
    if TRANSFORMERS >= (5, 0):
        restore_word_start_normalizer(tokenizer, name)
    return tokenizer


def has_tokenizer_files(directory: str) -> bool:
    """Whether `directory` holds a file a tokenizer is read from: `tokenizer*` (tokenizer.json, tokenizer_config.json,
    tokenizer.model), a vocabulary (`vocab*`, merges.txt), a SentencePiece or tiktoken model (`*.model`,
    `*.tiktoken`) or special_tokens_map.json."""
    return any(os.path.isfile(os.path.join(directory, f)) and (
        f.startswith(("tokenizer", "vocab", "special_tokens_map")) or f.endswith((".model", ".tiktoken"))
        or f == "merges.txt") for f in os.listdir(directory))


def tokenizer_file(name_or_path: str, filename: str) -> Optional[str]:
    """The local path of a tokenizer directory's (or Hub repository's) file `filename`, or None when it has none."""
    try:
        return cached_file(name_or_path, filename, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)
    except OSError:
        return None


def missing_sentencepiece_packages(name_or_path: str) -> list[str]:
    """The packages transformers needs to read a tokenizer directory holding a SentencePiece `tokenizer.model` and
    no tokenizer.json (LLaMA-1-era conversions) that are not installed; empty for any other directory. Without them
    transformers 5 reads the file as a tiktoken one and fails far from the cause."""
    if tokenizer_file(name_or_path, "tokenizer.json") or not tokenizer_file(name_or_path, "tokenizer.model"):
        return []
    from transformers.utils import is_protobuf_available, is_sentencepiece_available

    return [package for package, available in (("sentencepiece", is_sentencepiece_available()),
                                               ("protobuf", is_protobuf_available())) if not available]


WORD_START = "▁"  # SentencePiece's word-start mark


def prepends_word_start(normalizer: Optional[Mapping[str, Any]]) -> bool:
    """Whether a tokenizer.json's `normalizer` (its JSON) holds a `Prepend("▁")` step."""
    if not normalizer:
        return False
    steps = normalizer.get("normalizers", []) if normalizer.get("type") == "Sequence" else [normalizer]
    return any(step.get("type") == "Prepend" and step.get("prepend") == WORD_START for step in steps)


def restore_word_start_normalizer(tokenizer: PreTrainedTokenizerBase, name_or_path: str) -> None:
    """Put its tokenizer.json's own pipeline back into `tokenizer` when that normalizer prepends `▁`, or when the
    tokenizer is `legacy` (transformers 5's `LlamaTokenizer` then builds a `Metaspace` that prepends `▁` after every
    special token, whatever the file's says: the saved file would say so, and lose `legacy`, and the processor
    loaded back tokenize otherwise); for a LLaMA directory without tokenizer.json (its SentencePiece
    `tokenizer.model` alone), the legacy pipeline transformers 4 built from it (`legacy_llama_pipeline`), unless its
    config says `legacy: false` (`load_tokenizer`)."""
    if not hasattr(tokenizer, "backend_tokenizer"):
        return
    path = tokenizer_file(name_or_path, "tokenizer.json")
    if path is None:
        config = sentencepiece_llama_config(tokenizer, name_or_path)
        if config is not None and config.get("legacy") is not False:
            legacy_llama_pipeline(tokenizer, add_prefix_space=config.get("add_prefix_space") is not False)
        return
    with open(path, encoding="utf-8") as f:
        if not prepends_word_start(json.load(f).get("normalizer")) and getattr(tokenizer, "legacy", None) is not True:
            return
    own = Tokenizer.from_file(path)
    backend = tokenizer.backend_tokenizer
    backend.normalizer, backend.pre_tokenizer, backend.decoder = own.normalizer, own.pre_tokenizer, own.decoder
    _keep_legacy(tokenizer)


def sentencepiece_llama_config(tokenizer: PreTrainedTokenizerBase, name_or_path: str) -> Optional[dict[str, Any]]:
    """The tokenizer_config.json (empty when there is none) of a `LlamaTokenizer` read from a SentencePiece
    `tokenizer.model`; None for any other tokenizer."""
    from transformers import LlamaTokenizer

    if type(tokenizer) is not LlamaTokenizer or tokenizer_file(name_or_path, "tokenizer.model") is None:
        return None
    path = tokenizer_file(name_or_path, "tokenizer_config.json")
    if path is None:
        return {}
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    return config if isinstance(config, dict) else {}


def legacy_llama_pipeline(tokenizer: PreTrainedTokenizerBase, add_prefix_space: bool = True) -> None:
    """Give a LLaMA tokenizer the pipeline transformers 4 built from its SentencePiece model when `legacy` is not
    false (its `LlamaConverter`), which is SentencePiece's own: every text run, the runs after special tokens too,
    starts with `▁` (normalizer Prepend("▁") + Replace(" ", "▁"), no pre-tokenizer); decoding drops that first
    `▁`. transformers 5's `LlamaTokenizer` builds a non-legacy `Metaspace` whatever the config says."""
    backend = tokenizer.backend_tokenizer
    prepend = [normalizers.Prepend(WORD_START)] if add_prefix_space else []
    backend.normalizer = normalizers.Sequence([*prepend, normalizers.Replace(" ", WORD_START)])
    backend.pre_tokenizer = None
    strip = [decoders.Strip(" ", 1, 0)] if add_prefix_space else []
    backend.decoder = decoders.Sequence([decoders.Replace(WORD_START, " "), decoders.ByteFallback(), decoders.Fuse(),
                                         *strip])
    _keep_legacy(tokenizer)


def _keep_legacy(tokenizer: PreTrainedTokenizerBase) -> None:
    if hasattr(tokenizer, "legacy"):
        tokenizer.legacy = True
        tokenizer.init_kwargs["legacy"] = True  # saved in tokenizer_config.json


# Where a directory keeps its image processor's settings: its own file, or a processor's file holding them.
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def load_image_processor(name_or_path: str) -> Any:
    """The HF image processor saved with a vision tower, without torchvision if need be.

    Some transformers 5 releases map e.g. `CLIPImageProcessor` to a torchvision backend and refuse to load without
    it; their PIL twin (`CLIPImageProcessorPil`) computes the same thing from PIL/numpy. A directory without its
    settings (a tower saved by `save_pretrained` alone, or a directory that is no vision tower) and a name that
    cannot be read are a ValueError naming them, not transformers' OSError.
    """
    if os.path.isdir(name_or_path) and not any(os.path.isfile(os.path.join(name_or_path, f))
                                               for f in IMAGE_PROCESSOR_FILES):
        raise ValueError(f"no preprocessor_config.json in {name_or_path!r}: is it a vision tower's directory? A "
                         "tower saved without its image processor needs it saved beside it "
                         "(`AutoImageProcessor.from_pretrained(ORIGINAL).save_pretrained(DIR)`)")
    try:
        return AutoImageProcessor.from_pretrained(name_or_path)
    except OSError as e:
        raise ValueError(f"cannot load an image processor from {name_or_path!r}: "
                         f"{(str(e).splitlines() or [type(e).__name__])[0]}") from e
    except ImportError:
        import transformers
        from transformers.image_processing_utils import ImageProcessingMixin

        config, _ = ImageProcessingMixin.get_image_processor_dict(name_or_path)
        name = str(config.get("image_processor_type", "")).removesuffix("Fast")
        for candidate in (name + "Pil", name):
            cls = getattr(transformers, candidate, None)
            if cls is not None:
                try:
                    return cls.from_pretrained(name_or_path)
                except ImportError:
                    continue
        raise


# The processor's settings: `FlamingoProcessor`'s keyword arguments, saved in flamingo_processor.json.
PROCESSOR_SETTINGS = ("max_length", "max_frames", "video_fps", "padding_side", "image_references", "template")


def check_processor_settings(settings: Mapping[str, Any]) -> None:
    """ValueError for a setting no model runs with, among those `settings` names: a `max_length` (None: the
    tokenizer's `model_max_length`, `FlamingoProcessor`) or `max_frames` that is not an integer >= 1, a `video_fps`
    that is not a finite number > 0, an `image_references` that is not true or false. Checked where a processor is
    made and again before it is saved, so that a value set on it later is not written (JSON would hold `NaN`) to
    fail in another process."""
    def integer(value: Any) -> bool:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)

    if "max_length" in settings and settings["max_length"] is not None and not (
            integer(settings["max_length"]) and settings["max_length"] >= 1):
        raise ValueError(f"max_length must be an integer >= 1 (or null: the tokenizer's model_max_length, no limit "
                         f"if it sets none), got {settings['max_length']!r}")
    if "max_frames" in settings and not (integer(settings["max_frames"]) and settings["max_frames"] >= 1):
        raise ValueError(f"max_frames must be an integer >= 1, got {settings['max_frames']!r}")
    fps = settings.get("video_fps", 1.0)
    if not (isinstance(fps, numbers.Real) and not isinstance(fps, bool) and math.isfinite(fps) and fps > 0):
        raise ValueError(f"video_fps must be a finite number > 0, got {fps!r}")
    if not isinstance(settings.get("image_references", False), bool):
        raise ValueError(f"image_references must be true or false, got {settings['image_references']!r}")
    if settings.get("padding_side", "left") not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {settings['padding_side']!r}")
    if settings.get("template", "flamingo") not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}, got {settings['template']!r}")


def has_saved_processor(directory: str) -> bool:
    """Whether a saved model's `directory` holds its processor (`FlamingoProcessor.save_pretrained`'s settings file,
    or at least a tokenizer's)."""
    return any(os.path.isfile(os.path.join(directory, f)) for f in (PROCESSOR_CONFIG_NAME, "tokenizer_config.json"))


def read_processor_settings(path: str) -> dict[str, Any]:
    """A flamingo_processor.json -> its settings, checked (`check_processor_settings`, unknown names refused: a
    newer version's file, or a hand edit's typo, is not half read); errors name the file."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError: a truncated or damaged file
        raise ValueError(f"{path!r} is not readable JSON (truncated or damaged?): {e}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{path!r} holds a JSON {type(raw).__name__}, not an object of processor settings")
    unknown = sorted(set(raw) - set(PROCESSOR_SETTINGS))
    if unknown:
        raise ValueError(f"{path!r} names unknown processor settings {unknown} (written by a newer version?); "
                         f"known: {list(PROCESSOR_SETTINGS)}")
    try:
        check_processor_settings(raw)
    except ValueError as e:
        raise ValueError(f"{path!r}: {e}") from e
    return raw


class FlamingoProcessor:
    """Tokenizer + the vision tower's HF image processor, with Flamingo's prompt conventions."""

    media_token = MEDIA_TOKEN
    end_of_chunk_token = END_OF_CHUNK_TOKEN

    def __init__(self, tokenizer: PreTrainedTokenizerBase, image_processor: Any, *, max_length: Optional[int] = None,
                 max_frames: int = 8, video_fps: float = 1.0, padding_side: str = "left",
                 image_references: bool = False, template: str = "flamingo") -> None:
        """template: "flamingo" (prompts as written, `<|endofchunk|>` between examples), "otter" (prompts as written;
        chat turns in Otter's `User: ... GPT:<answer>` format, flamingo/chat.py), "mmgpt" (the same; chat turns in
        Multimodal-GPT's `### Instruction:` / `### Response:` format) or "idefics" (IDEFICS's format:
        `idefics_prompt`; an IDEFICS prompt works unchanged, `<end_of_utterance>` for the instruct models).
        max_length: the longest prompt encoded; None (null in flamingo_processor.json): the tokenizer's
        `model_max_length`, no limit when it sets none (HF's huge default). `from_backbones` sets it from the LM's
        positions; a larger integer lifts a tokenizer's limit."""
        if template not in TEMPLATES:
            raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
        check_processor_settings({"max_length": max_length, "max_frames": max_frames, "video_fps": video_fps,
                                  "image_references": image_references})
        idefics = template == "idefics"
        needed = (MEDIA_TOKEN, IDEFICS_IMAGE_WRAPPER) if idefics else (MEDIA_TOKEN, END_OF_CHUNK_TOKEN)
        missing = [t for t in needed if t not in tokenizer.get_vocab()]
        if missing or tokenizer.pad_token_id is None:
            raise ValueError(f"tokenizer lacks the {template} prompt tokens {missing or ['<pad>']}"
                             + ("" if idefics else ": call add_flamingo_tokens first"))
        self.template = template
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.tokenizer = tokenizer
        check_markers_whole(tokenizer, needed)
        self.image_processor = image_processor
        model_max = getattr(tokenizer, "model_max_length", None)
        if max_length is None and model_max and model_max < 10**7:  # HF's "no limit" is a huge number
            max_length = int(model_max)  # a JSON writer may store it as a float (256.0), which no setting takes
        self.max_length = max_length
        self.max_frames = max_frames
        self.video_fps = video_fps
        self.padding_side = padding_side
        # declared-image prompts (`Image 0 is <image0> ... <image0>`, references.py) instead of `<image>` ones
        self.image_references = image_references
        vocab = tokenizer.get_vocab()  # the reference tokens `<image0>`, `<image1>`, ... it holds
        self.num_references = next(k for k in range(len(vocab) + 1) if reference_token(k) not in vocab)
        if image_references and self.num_references == 0:
            raise ValueError("image_references needs a tokenizer with `<image0>` ... (FlamingoConfig."
                             "num_image_references > 0 in from_backbones)")
        self.appended_ids = appended_special_ids(tokenizer)

    def token_ids(self, text: str, *, special_tokens: bool = True) -> list[int]:
        """`text` -> token ids, however long. Every caller checks the length itself and says what it does about it
        (raises, truncates, or skips and counts), so HF's warning for sequences over `model_max_length` ("will result
        in indexing errors"), untrue for all of them, is not printed. Half a UTF-16 surrogate pair (an emoji a scraper
        cut, read from JSON) is tokenized as U+FFFD (`valid_text`, as training data reads it): tokenizers take valid
        Unicode only. special_tokens: those the tokenizer writes before the text (BOS), never those it appends after
        it (`appended_ids`). The text's special tokens (`<image>`, `<|endofchunk|>`, a chat format's) are read as tokens
        whatever the tokenizer's `split_special_tokens` says: the processor and the chat formats write them into the
        text, and any other special token spelled there is read as one too."""
        ids = self.tokenizer(valid_text(text), add_special_tokens=special_tokens, split_special_tokens=False,
                             verbose=False)["input_ids"]
        return ids[:len(ids) - self.appended(ids)] if special_tokens else ids

    def appended(self, ids: Sequence[int]) -> int:
        """How many of the last tokens of `ids` (a text encoded with its special tokens) the tokenizer appended after
        the text (`appended_ids`): what the processor drops."""
        n = len(self.appended_ids)
        return n if n and tuple(ids[len(ids) - n:]) == self.appended_ids else 0

    def prompt_text(self, text: str) -> tuple[str, bool]:
        """A prompt's text -> (the string its template tokenizes, whether the tokenizer adds its special tokens)."""
        if self.template == "idefics":  # BOS written into the text, as IDEFICS's processor does
            return idefics_prompt(text, self.tokenizer.bos_token), False
        return text, True

    def prompt_ids(self, text: str) -> list[int]:
        """A prompt's text (`<image>` placeholders, declarations resolved) -> the ids the model reads, its template's
        special tokens included."""
        final, special = self.prompt_text(text)
        return self.token_ids(final, special_tokens=special)

    @property
    def media_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(MEDIA_TOKEN)

    @property
    def media_marker_ids(self) -> tuple[int, ...]:
        """The ids the template writes around each `<image>` (IDEFICS's `<fake_token_around_image>`): format, never
        a training target."""
        return (self.tokenizer.convert_tokens_to_ids(IDEFICS_IMAGE_WRAPPER),) if self.template == "idefics" else ()

    @property
    def end_of_chunk_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(END_OF_CHUNK_TOKEN)

    # ----------------------------------------------------------------------------------------------------- media
    def load_media(self, media: Media) -> list[Image.Image]:
        """Any accepted medium but a tensor -> its frames as RGB PIL images (one frame for a still), at most
        `max_frames`, spread uniformly over longer videos. PIL images and frames are read as files are
        (`upright_rgb`); arrays must be uint8 pixels (other dtypes are refused, not cast: a float image in [0, 1]
        would turn black, 16-bit values wrap). A file's frames are read under `default_max_pixels`, as training's:
        its refusal over it (`TooManyPixels`) names the knob that sets it."""
        if isinstance(media, (str, os.PathLike)):
            try:
                return self._load_file(Path(media), default_max_pixels())
            except TooManyPixels as e:
                raise e.reworded(f"{e} (the cap is PIL.Image.MAX_IMAGE_PIXELS, read when a medium is: set it "
                                 "higher, or to None, to read larger media)") from e
        if isinstance(media, Image.Image):
            return image_frames(media, self.video_fps, self.max_frames)
        if isinstance(media, np.ndarray):
            frames = media[None] if media.ndim == 3 else media  # (F, H, W, 3)
            if frames.ndim != 4 or frames.shape[-1] != 3 or media.dtype != np.uint8:
                raise ValueError(f"array media must be (H, W, 3) or (F, H, W, 3) uint8, got shape {media.shape} "
                                 f"{media.dtype}")
            if frames.shape[0] == 0:
                raise ValueError(f"array media of shape {media.shape} has no frames")
            check_image_size(frames.shape[2], frames.shape[1])
            return [Image.fromarray(f) for f in frames[uniform_frame_indices(len(frames), self.max_frames)]]
        if isinstance(media, (list, tuple)) and all(isinstance(f, Image.Image) for f in media):
            if not media:
                raise ValueError("a video given as a list of PIL frames has no frames")
            return [upright_rgb(media[i]) for i in uniform_frame_indices(len(media), self.max_frames)]
        raise ValueError(
            f"unsupported media type {type(media).__name__}: expected a PIL image, a list of PIL frames, "
            "a uint8 array (H, W, 3) or (F, H, W, 3), pixel values (F, C, H, W) or a file path")

    def _load_file(self, path: Path, max_pixels: Optional[int]) -> list[Image.Image]:
        """`load_media`'s file: a video by its extension, else an image PIL reads, else a video by its content."""
        if not path.is_file():
            raise ValueError(f"media file not found: {str(path)!r}")
        if path.suffix.lower() in VIDEO_EXTENSIONS:
            return decode_video(str(path), fps=self.video_fps, max_frames=self.max_frames, max_pixels=max_pixels)
        try:
            # raster readers only, without Pillow's warning of an image over its MAX_IMAGE_PIXELS (the cap), which
            # `image_frames` refuses by the same header size: the refusal alone is shown (runtime/media_formats)
            with open_image(path) as im:
                return image_frames(im, self.video_fps, self.max_frames, max_pixels=max_pixels)
        except UnidentifiedImageError as e:  # no image PIL knows: a video under another name (.ts, .mts, none)?
            return self._video_named_otherwise(path, e, max_pixels)
        except TooManyPixels as e:
            animation = "an animation " if isinstance(e, TooLong) else ""  # its message follows the word
            raise e.reworded(f"cannot decode image {str(path)!r}: {animation}{e}") from e
        except Image.DecompressionBombError as e:  # over twice the cap, refused by Pillow on opening (no size)
            cap = Image.MAX_IMAGE_PIXELS
            raise TooManyPixels(0, 0, None, cap, f"cannot decode image {str(path)!r}: more than twice the {cap} "
                                                 f"pixels allowed ({e})") from e
        except Exception as e:  # PIL raises several types for corrupt files
            raise ValueError(f"cannot decode image {str(path)!r}: {e}") from e

    def _video_named_otherwise(self, path: Path, image_error: Exception,
                               max_pixels: Optional[int]) -> list[Image.Image]:
        """A file PIL cannot identify, read as a video: what a file holds decides, not its name (MPEG-TS from
        cameras and IPTV dumps, `.mts`, extensionless temporary files). Neither: a ValueError naming both tries."""
        try:
            return decode_video(str(path), fps=self.video_fps, max_frames=self.max_frames, max_pixels=max_pixels)
        except ImportError as e:  # no PyAV: the file may be no video at all
            video_error: Exception = e
        except ValueError as e:
            video_error = e
        message = f"cannot decode image {str(path)!r}: {image_error}; nor as a video: {video_error}"
        if isinstance(video_error, TooManyPixels):
            raise video_error.reworded(message) from video_error
        raise ValueError(message) from video_error

    def check_pixel_values(self, media: torch.Tensor) -> torch.Tensor:
        """Pixel values given as a tensor `(C, H, W)` or `(F, C, H, W)`, as the image processor makes them ->
        `(F, C, H, W)` float, at most `max_frames` frames spread uniformly over longer videos (as other media).
        Refused: integer dtypes (raw pixels: give those as an array or PIL image), channels last, no frames,
        NaN or infinite values."""
        shape = tuple(media.shape)
        expected = "tensor media must be preprocessed pixel values (C, H, W) or (F, C, H, W)"
        if media.ndim not in (3, 4):
            raise ValueError(f"{expected}, got shape {shape}")
        if not media.is_floating_point():
            raise ValueError(f"{expected} in a floating-point dtype, got {media.dtype}: give raw pixels as a uint8 "
                             "array (H, W, 3) or a PIL image")
        if shape[-1] == 3 and shape[-3] != 3:
            raise ValueError(f"{expected}, got shape {shape}: channels last? Put channels before height and width "
                             "(`.permute`)")
        frames = media[None] if media.ndim == 3 else media  # (F, C, H, W)
        if frames.numel() == 0:
            raise ValueError(f"{expected}, got shape {shape}: no frames or no pixels")
        if not bool(torch.isfinite(frames).all()):
            raise ValueError(f"tensor media of shape {shape} holds NaN or infinite values")
        if frames.shape[0] > self.max_frames:
            frames = frames[uniform_frame_indices(frames.shape[0], self.max_frames)]
        return frames.float()

    def preprocess_media(self, media: Media) -> torch.Tensor:
        """One medium -> pixel values `(F, C, H, W)` from the vision tower's image processor (a tensor: checked by
        `check_pixel_values`)."""
        if isinstance(media, torch.Tensor):
            return self.check_pixel_values(media)
        frames = self.load_media(media)
        return self.image_processor(images=frames, return_tensors="pt")["pixel_values"]  # (F, C, H, W)

    @staticmethod
    def batch_media(media: Sequence[Sequence[torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Per-sample lists of `(F, C, H, W)` tensors -> `images (B, N, F, C, H, W)`, `num_media`, `num_frames`.

        Missing media and frames are zeros; `num_media (B,)` and `num_frames (B, N)` tell the model what is real.
        """
        batch = len(media)
        n_max = max((len(m) for m in media), default=0)
        shapes = {tuple(t.shape[1:]) for m in media for t in m}
        if len(shapes) > 1:
            raise ValueError(f"all media in a batch must share one pixel shape, got {sorted(shapes)}")
        num_media = torch.tensor([len(m) for m in media], dtype=torch.long)
        num_frames = torch.zeros(batch, n_max, dtype=torch.long)
        if n_max == 0:
            return {"images": None, "num_media": num_media, "num_frames": num_frames}
        f_max = max(t.shape[0] for m in media for t in m)
        images = torch.zeros(batch, n_max, f_max, *shapes.pop())
        for b, sample in enumerate(media):
            for n, t in enumerate(sample):
                images[b, n, : t.shape[0]] = t
                num_frames[b, n] = t.shape[0]
        return {"images": images, "num_media": num_media, "num_frames": num_frames}

    # ------------------------------------------------------------------------------------------------------ text
    def _split_prompt(self, prompt: Any, media: Union[Media, Sequence[Media], None]) -> tuple[str, list[Media]]:
        if isinstance(prompt, str):
            return prompt, media_list(media)
        if isinstance(prompt, (list, tuple)):
            if media_list(media):
                raise ValueError("give media either inside an interleaved list or as `images`, not both")
            if self.template == "idefics":
                return idefics_list_text(prompt)
            text, found = [], []
            for part in prompt:
                if isinstance(part, str):
                    text.append(part)
                else:
                    text.append(MEDIA_TOKEN)
                    found.append(part)
            return "".join(text), found
        raise ValueError(f"a prompt must be a string or a list mixing strings and media, got {type(prompt).__name__}")

    def declares_media(self, text: str) -> bool:
        """Whether `text` reads only as a declared-image prompt: it places no `<image>`, declares some
        (`Image 0 is <image0>`), and the tokenizer has reference tokens (`encode_prompt`'s default reading)."""
        return bool(self.num_references and MEDIA_TOKEN not in text and DECLARATION.search(text))

    def encode_prompt(self, prompt: Any, media: Union[Media, Sequence[Media], None] = None,
                      max_length: Optional[int] = None, image_references: Optional[bool] = None
                      ) -> tuple[list[int], list[torch.Tensor]]:
        """One prompt -> (token ids, list of `(F, C, H, W)` media), checking placeholder count and length.
        image_references (default: the processor's): the prompt declares its images (`Image 0 is <image0>`). By
        default a string prompt that places no `<image>` and declares its media, with a tokenizer that has reference
        tokens, is read as declared whatever the processor's setting: that is the only reading its media fit (a model
        trained on declared images is served so, without a setting a CLI user could not give)."""
        text, media = self._split_prompt(prompt, media)
        if image_references is None:
            image_references = self.image_references or bool(isinstance(prompt, str) and media
                                                             and self.declares_media(text))
        if image_references:
            if not isinstance(prompt, str) and media:  # the list placed its media as <image>: none is declared
                raise ValueError("an interleaved-list prompt places its media where they stand, so it cannot declare "
                                 "them, and this processor reads declared-image prompts (image_references): write a "
                                 "string prompt declaring each medium, `Image 0 is <image0>. ...`, with the media as "
                                 "`images`, or pass image_references=False to place the list's media as <image>")
            text = resolve_declarations(text, len(media), self.num_references)
        ids = self.prompt_ids(text)
        n_placeholders = sum(1 for i in ids if i == self.media_token_id)
        if n_placeholders != len(media):
            raise ValueError(f"prompt has {n_placeholders} {MEDIA_TOKEN} placeholder(s) but {len(media)} "
                             f"image(s)/video(s) were given: {text[:120]!r}")
        limit = max_length if max_length is not None else self.max_length
        if limit is not None and len(ids) > limit:
            raise ValueError(f"prompt is {len(ids)} tokens, longer than max_length={limit}")
        pixels = []
        for i, medium in enumerate(media):
            try:
                pixels.append(self.preprocess_media(medium))
            except ValueError as e:
                raise ValueError(f"medium {i} of the prompt: {e}") from e
        return ids, pixels

    def pad(self, sequences: Sequence[Sequence[int]], padding_side: Optional[str] = None) -> dict[str, torch.Tensor]:
        """Pad token id lists to `input_ids (B, T)` and `attention_mask (B, T)`."""
        side = padding_side or self.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        length = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), length), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(len(sequences), length, dtype=torch.long)
        for b, seq in enumerate(sequences):
            sl = slice(length - len(seq), length) if side == "left" else slice(0, len(seq))
            input_ids[b, sl] = torch.tensor(seq, dtype=torch.long)
            attention_mask[b, sl] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def __call__(self, text: Any, images: Optional[Sequence[Any]] = None, *, padding_side: Optional[str] = None,
                 max_length: Optional[int] = None, image_references: Optional[bool] = None) -> BatchFeature:
        """Encode one prompt or a batch.

        text: a string, an interleaved list, or a list of either (a batch).
        images: for one string prompt, its list of media; for a batch of strings, one list of media per prompt. A
        medium given alone (a path, a PIL image, an array or a tensor: one image or one video) stands for a list of
        that one medium.
        Returns `input_ids (B, T)`, `attention_mask (B, T)`, `images (B, N, F, C, H, W)` (None when no media),
        `num_media (B,)`, `num_frames (B, N)`.
        """
        def is_prompt(part: Any) -> bool:  # a string, or an interleaved list (a video's frame list holds no text)
            return isinstance(part, str) or (isinstance(part, (list, tuple)) and any(isinstance(x, str) for x in part))

        single = isinstance(text, str) or (isinstance(text, (list, tuple)) and not all(is_prompt(p) for p in text))
        prompts = [text] if single else list(text)
        if not prompts:
            raise ValueError("no prompts given")
        if single:
            per_prompt = [[images] if isinstance(images, ONE_MEDIUM) else images]
        elif images is None:
            per_prompt = [None] * len(prompts)
        else:
            if isinstance(images, ONE_MEDIUM) or len(images) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but media lists for "
                                 f"{1 if isinstance(images, ONE_MEDIUM) else len(images)}")
            per_prompt = [[m] if isinstance(m, ONE_MEDIUM) else m for m in images]
        encoded = [self.encode_prompt(p, m, max_length, image_references) for p, m in zip(prompts, per_prompt)]
        out = self.pad([ids for ids, _ in encoded], padding_side)
        out.update(self.batch_media([m for _, m in encoded]))
        return BatchFeature(out)

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        """Token ids -> text. skip_special_tokens: leave out the control tokens (EOS, padding, `<image>`,
        `<|endofchunk|>`, a chat format's end markers: `hidden_ids`) but keep the reference tokens `<imageK>`, which
        name an image in a generated answer (docs/data.md) and are text there."""
        if not skip_special_tokens:
            return self.tokenizer.decode(ids, skip_special_tokens=False)
        ids = ids.tolist() if isinstance(ids, (torch.Tensor, np.ndarray)) else ids
        ids = [ids] if isinstance(ids, numbers.Integral) else list(ids)
        return self.tokenizer.decode([i for i in ids if i not in self.hidden_ids], skip_special_tokens=False)

    def batch_decode(self, ids: Any, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(row, skip_special_tokens) for row in ids]

    @functools.cached_property
    def hidden_ids(self) -> frozenset[int]:
        """The ids `decode(skip_special_tokens=True)` leaves out: those the tokenizer's own skipping drops, and the
        prompt markers, except the reference tokens."""
        tok = self.tokenizer
        references = {tok.convert_tokens_to_ids(reference_token(k)) for k in range(self.num_references)}
        candidates = set(getattr(tok, "added_tokens_decoder", {})) | set(tok.all_special_ids)
        # the prompt markers too where the tokenizer held them as plain added tokens (not skipped by its decode)
        markers = {tok.convert_tokens_to_ids(t) for t in (MEDIA_TOKEN, END_OF_CHUNK_TOKEN, IDEFICS_IMAGE_WRAPPER)
                   if t in tok.get_vocab()}
        return frozenset(markers - references) | frozenset(
            i for i in candidates - references if tok.decode([i], skip_special_tokens=True) == "")

    # ---------------------------------------------------------------------------------------------- persistence
    def save_pretrained(self, directory: str) -> None:
        check_named(directory, "the processor's directory")
        settings = {name: getattr(self, name) for name in PROCESSOR_SETTINGS}
        check_processor_settings(settings)  # a value set after __init__ is not written to fail elsewhere
        os.makedirs(directory, exist_ok=True)
        self.tokenizer.save_pretrained(directory)
        self.image_processor.save_pretrained(directory)
        with open(os.path.join(directory, PROCESSOR_CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(settings, f, indent=2)

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, revision: Optional[str] = None,
                        **overrides: Any) -> "FlamingoProcessor":
        """The processor saved with a model: a directory, or a Hub repository holding one (`org/name`; its processor
        files alone are fetched). Its settings file is checked (`read_processor_settings`)."""
        directory = metadata_dir(name_or_path, "Flamingo processor", revision=revision)
        path = os.path.join(directory, PROCESSOR_CONFIG_NAME)
        kwargs = read_processor_settings(path) if os.path.isfile(path) else {}
        kwargs.update(overrides)
        tokenizer = load_tokenizer(directory)
        image_processor = load_image_processor(directory)
        return cls(tokenizer, image_processor, **kwargs)
