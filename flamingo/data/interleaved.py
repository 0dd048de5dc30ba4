"""MMC4 interleaved documents -> `Example`s: each image placed before one sentence.

Placement. An image that carries MMC4's `matched_text_index` goes before that sentence, as the dataset gives it (MMC4
computes it by a one-to-one linear assignment over its CLIP `similarity_matrix`), if its score (`matched_sim`, else its
`similarity_matrix` entry, else 1.0) is at least `similarity_threshold`. An image without one is placed by its
`similarity_matrix` row. `match_images` then pairs images and sentences one-to-one, greedily by decreasing score: an
image with an index gets its sentence unless an image scoring higher there takes it (MMC4's indices never share one),
and images placed by the matrix get a greedy matching, which can differ from an optimal assignment. OpenFlamingo's
loader differs by version: v1 (pip 0.0.2) takes `matched_text_index` (an image naming a sentence already taken is
dropped), v2 takes each image's argmax sentence (several images may share one), and its main branch solves its own
linear assignment (`scipy.optimize.linear_sum_assignment`) over the matrix rows of the images that load, ignoring
`matched_text_index`.

Text. The `<image>` goes right before its sentence; `<|endofchunk|>` closes every chunk (an image's text, up to the next
image) and the document (for a tokenizer without it, nothing: `DatasetSpec.chunk_end`). Only the first `max_images`
placed images (in document order) are kept; the token truncation may drop more (see `sequence.encode_example`). Text
before the first image stays in the sequence as context but is not trained. A sentence may refer back to an image
with `<imagek>`; a document that writes one the model has no reference token for is skipped (`bad_record`,
`sequence.check_references`).
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Optional

import numpy as np

from ..config import END_OF_CHUNK_TOKEN, MEDIA_TOKEN
from .errors import SkipSample
from .sequence import Example, clean_text
from .sources import MediaRef, RawRecord, file_ref, member_ref, parse_json_record, resolve_relative


def match_images(similarity: np.ndarray, threshold: float) -> dict[int, int]:
    """Greedy one-to-one matching by decreasing similarity. similarity (n_images, n_sentences) -> {sentence: image}.

    Entries below `threshold` (or NaN / -inf: unusable images or empty sentences) are never matched; ties go to the
    lower image, then the lower sentence index.
    """
    sim = np.nan_to_num(np.asarray(similarity, dtype=np.float64), nan=-np.inf)
    n_images, n_sentences = sim.shape
    order = np.argsort(-sim, axis=None, kind="stable")
    used_images: set[int] = set()
    assignment: dict[int, int] = {}
    for flat in order:
        i, j = divmod(int(flat), n_sentences)
        if sim[i, j] < threshold:
            break
        if i in used_images or j in assignment:
            continue
        used_images.add(i)
        assignment[j] = i
        if len(used_images) == n_images:
            break
    return assignment


def build_interleaved_text(sentences: list[str], image_sentences: list[int], eos: str = "") -> str:
    """Sentences + the (sorted) indices of the sentences that get an image -> the training text.

    `["A", "B", "C"]`, images before B and C -> `"A<image>B<|endofchunk|><image>C<|endofchunk|>{eos}"`.
    """
    chosen = set(image_sentences)
    parts = [f"{END_OF_CHUNK_TOKEN}{MEDIA_TOKEN}{s}" if j in chosen else s
             for j, s in enumerate(sentences) if s or j in chosen]
    text = " ".join(parts).replace(END_OF_CHUNK_TOKEN, "", 1)  # no chunk to close before the first image
    text = (text.replace(f" {END_OF_CHUNK_TOKEN}", END_OF_CHUNK_TOKEN).replace(f"{MEDIA_TOKEN} ", MEDIA_TOKEN)
            .replace(f" {MEDIA_TOKEN}", MEDIA_TOKEN))
    return f"{text}{END_OF_CHUNK_TOKEN}{eos}"


def _score(value: Any, where: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError) as e:
        raise SkipSample("bad_record", f"{where} is not a number: {e}") from e


def _similarity(doc: dict[str, Any], n_images: int, n_sentences: int, where: str) -> np.ndarray:
    """The (n_images, n_sentences) scores `match_images` places images by (module docstring): an image with a
    `matched_text_index` scores at that sentence only, one without by its `similarity_matrix` row (-inf without
    one: never placed)."""
    raw, matrix = doc.get("similarity_matrix"), None
    if raw is not None:
        try:
            matrix = np.asarray(raw, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise SkipSample("bad_record", f"{where}: similarity_matrix is not numeric: {e}") from e
        if matrix.shape != (n_images, n_sentences):
            raise SkipSample("bad_record", f"{where}: similarity_matrix has shape {matrix.shape}, expected "
                                           f"({n_images}, {n_sentences}) (images x sentences)")
    sim = np.full((n_images, n_sentences), -np.inf)
    for i, info in enumerate(doc["image_info"]):
        j = info.get("matched_text_index")
        if j is None:
            if matrix is not None:
                sim[i] = matrix[i]
            continue
        if isinstance(j, float) and j.is_integer():  # `3.0`, as a table tool may write it
            j = int(j)
        if isinstance(j, bool) or not isinstance(j, int) or not 0 <= j < n_sentences:
            raise SkipSample("bad_record", f"{where}: image_info[{i}].matched_text_index {j!r} names no sentence "
                                           f"(0..{n_sentences - 1})")
        if "matched_sim" in info:
            sim[i, j] = _score(info["matched_sim"], f"{where}: image_info[{i}].matched_sim")
        else:
            sim[i, j] = matrix[i, j] if matrix is not None else 1.0
    return sim


def _image_ref(info: dict[str, Any], record: RawRecord, image_dir: Optional[str], where: str) -> Optional[MediaRef]:
    if info.get("image_base64"):
        encoded = info["image_base64"]
        if not isinstance(encoded, str):
            raise SkipSample("bad_record", f"{where}: image_base64 must be a string, got {type(encoded).__name__}")

        def read() -> bytes:
            try:
                return base64.b64decode(encoded, validate=False)
            except (binascii.Error, ValueError) as e:
                raise SkipSample("bad_image", f"{where}: bad base64: {e}") from e

        return MediaRef(f"{where}:base64", read)
    name = info.get("image_name")
    if not isinstance(name, str) or not name:
        return None
    if record.shard is not None:
        member = record.shard.find(name, record.group)
        if member is None:
            def missing() -> bytes:
                raise SkipSample("missing_file", f"{where}: no member {name!r} in {record.file!r}")

            return MediaRef(name, missing)
        return member_ref(record.shard, member)
    return file_ref(resolve_relative(image_dir or record.base_dir, name))


def load_document(record: RawRecord) -> dict[str, Any]:
    if record.shard is not None:
        member = record.payload.get("json")
        if member is None:
            raise SkipSample("bad_record", f"{record.key}: tar sample has no .json member")
        return parse_json_record(record.shard.read(member), f"{record.file}:{member.name}")
    return parse_json_record(record.payload, record.key)


def interleaved_example(record: RawRecord, *, similarity_threshold: float = 0.24, max_images: int = 5,
                        image_dir: Optional[str] = None, eos: str = "") -> Example:
    """One MMC4 document -> an `Example` (no media decoded yet); SkipSample for bad or image-less documents."""
    doc = load_document(record)
    where = record.key
    text_list, image_info = doc.get("text_list"), doc.get("image_info")
    if not isinstance(text_list, list) or not all(isinstance(s, str) for s in text_list):
        raise SkipSample("bad_record", f"{where}: text_list must be a list of strings")
    if not isinstance(image_info, list) or not all(isinstance(i, dict) for i in image_info):
        raise SkipSample("bad_record", f"{where}: image_info must be a list of objects")
    sentences = [clean_text(s) for s in text_list]
    if not any(sentences):
        raise SkipSample("empty_text", f"{where}: all sentences are empty")
    if not image_info:
        raise SkipSample("no_matched_image", f"{where}: the document has no images")
    sim = _similarity(doc, len(image_info), len(sentences), where)
    refs = [_image_ref(info, record, image_dir, f"{where}#img{i}") for i, info in enumerate(image_info)]
    if all(ref is None for ref in refs):  # no entry names an image file (a URL alone is not fetched)
        raise SkipSample("no_matched_image", f"{where}: no image entry names an image (image_name or image_base64)")
    for i, ref in enumerate(refs):
        if ref is None:  # names no image at all: never matched
            sim[i, :] = -np.inf
    for j, s in enumerate(sentences):
        if not s:  # an image before an empty sentence would have no text
            sim[:, j] = -np.inf
    assignment = match_images(sim, similarity_threshold)
    if not assignment:
        raise SkipSample("no_matched_image", f"{where}: no image matches a sentence at similarity >= "
                                             f"{similarity_threshold}")
    chosen = sorted(assignment)[:max_images]
    media = [refs[assignment[j]] for j in chosen]
    return Example(record.key, build_interleaved_text(sentences, chosen, eos), media)  # type: ignore[arg-type]
