"""Training sequences: text with `<image>` placeholders + lazy media -> token ids, labels, pixels -> batches.

The labelling rule (the contract's): labels are the input ids (the model shifts them), with -100 on `<image>` (and
the template's markers around it), on padding, and on every token before the first `<image>` (text no image precedes
is not trained). Text is tokenized in the processor's template, as the model is served. Conversations (data/chat.py)
instead label only the tokens of their answers (`Example.trained_spans`).

Against OpenFlamingo's training loop (open_flamingo/train/train_utils.py, `train_one_epoch`): pairs are labelled
alike (its line that means to mask EOS compares ids with the token's string and masks nothing, so it trains EOS as
we do). For MMC4 documents it also masks every token after each `<|endofchunk|>` up to the next `<image>`; as a
document's text puts `<image>` right after each `<|endofchunk|>` but the last, that masks exactly the final EOS. We
train that EOS (a document cut by `max_tokens` has none, and then the two agree): the model learns to end a document
after its last chunk, as a pair's EOS teaches it to end a caption (docs/data.md, step 6).

Only the markers a sequence is built from are special tokens in it: `<image>` (and the template's wrappers),
`<|endofchunk|>`, the image references `<imagek>`, a chat format's end markers, the template's leading BOS and an EOS
that ends the sequence (or, in a conversation, an answer). Any other special-token string the data spells out
(`</s>`, `<|endoftext|>`, `<PAD>` in a caption) is tokenized as plain text (`data_token_ids`): an EOS or pad id in
the middle of a caption would be trained as a target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Collection, Optional, Sequence

import torch

from ..chat import OTTER_ANSWER
from ..config import END_OF_CHUNK_TOKEN, END_OF_UTTERANCE, MEDIA_TOKEN
from ..processing import FlamingoProcessor
from ..references import REFERENCE, check_reference_index, reference_token
from ..runtime.lru import TensorCache
from .errors import SkipSample
from .sources import MediaRef

IGNORE_INDEX = -100


@dataclass
class Example:
    """A sample before tokenization: `text` holds one `<image>` per entry of `media`, in order."""

    key: str
    text: str
    media: list[MediaRef]
    # character spans of `text` to train on (conversations: the answers); None: the labelling rule above
    trained_spans: Optional[list[tuple[int, int]]] = None
    # images the record declared MMICL-style (`Image k is <imagek>`, already `<image>` in `text`): as for a declared
    # prompt, the model needs a reference token for each (`check_references`)
    declared_images: int = 0


@dataclass
class Encoded:
    """A sample ready to batch: `input_ids`, `labels` (same length), one `(F, C, H, W)` tensor per `<image>`."""

    key: str
    input_ids: list[int]
    labels: list[int]
    media: list[torch.Tensor]
    text: str
    truncated: bool = False  # cut by max_tokens: the end of its text (a caption's, an answer's) is not trained


def clean_text(text: str) -> str:
    """Raw text with the special markers removed, so the `<image>` count always equals the media count."""
    return text.replace(MEDIA_TOKEN, " ").replace(END_OF_CHUNK_TOKEN, " ").strip()


def make_labels(input_ids: Sequence[int], media_token_id: int, marker_ids: Sequence[int] = ()) -> list[int]:
    """-100 on `<image>` (and on `marker_ids`, a template's markers around it) and on everything before the first
    `<image>`; the ids elsewhere."""
    labels = list(input_ids)
    first = labels.index(media_token_id) if media_token_id in labels else len(labels)
    for t, tok in enumerate(labels):
        if t < first or tok == media_token_id or tok in marker_ids:
            labels[t] = IGNORE_INDEX
    return labels


def truncate_ids(ids: list[int], max_tokens: int, media_token_id: int, marker_ids: Sequence[int] = ()) -> list[int]:
    """Cut to `max_tokens`; an `<image>` left at the end (an image with no text) goes too, with the template's
    markers around it (`marker_ids`: IDEFICS's `<fake_token_around_image>`, which follows each `<image>`)."""
    ids = ids[:max_tokens]
    while ids and (ids[-1] == media_token_id or ids[-1] in marker_ids):
        ids.pop()
    return ids


def has_token(tokenizer: Any, token: str) -> bool:
    """Whether `tokenizer` holds `token` as one token."""
    found = tokenizer.convert_tokens_to_ids(token)
    return found is not None and (found != tokenizer.unk_token_id or token == tokenizer.unk_token)


def _marker_ids(processor: FlamingoProcessor, added: dict[str, int], chat: bool) -> set[int]:
    """The special ids a sequence is built from: `<image>`, the template's wrappers, `<|endofchunk|>`, the image
    references and, in a conversation, the chat formats' end markers (data/chat.py refuses them in message text)."""
    names = [MEDIA_TOKEN, END_OF_CHUNK_TOKEN, *(reference_token(k) for k in range(processor.num_references))]
    if chat:
        names += [END_OF_UTTERANCE, OTTER_ANSWER]
    return {added[n] for n in names if n in added} | set(processor.media_marker_ids)


def _stray_specials(processor: FlamingoProcessor, final: str, ids: Sequence[int], offsets: Sequence[tuple[int, int]],
                    answer_ends: Optional[Collection[int]]) -> list[int]:
    """The positions of the special tokens that the data spelled out (see the module docstring): not a marker, not
    the template's leading tokens (BOS), not an EOS that ends the sequence or an answer (`answer_ends`: where the
    answers end in `final`; None: not a conversation)."""
    tokenizer = processor.tokenizer
    decoder = tokenizer.added_tokens_decoder  # {id: AddedToken}
    specials = {i for i, t in decoder.items() if t.special} | set(tokenizer.all_special_ids)
    if specials.isdisjoint(ids):
        return []
    keep = _marker_ids(processor, {t.content: i for i, t in decoder.items()}, answer_ends is not None)
    eos = tokenizer.eos_token_id
    stray = []
    for k, (tok, (s, e)) in enumerate(zip(ids, offsets)):
        if tok not in specials or tok in keep or (tok == eos and (k == len(ids) - 1 or e in (answer_ends or ()))):
            continue
        if final[s:e] == tokenizer.convert_ids_to_tokens(tok):  # spelled out (not e.g. an unknown character's <unk>)
            stray.append(k)
    if stray and stray[0] == 0:  # what the template writes before any text (IDEFICS's BOS) is its own
        lead = len(processor.prompt_ids(""))
        stray = [k for k in stray if k >= lead]
    return stray


def data_token_ids(processor: FlamingoProcessor, final: str, special: bool,
                   answer_ends: Optional[Collection[int]] = None) -> tuple[list[int], list[tuple[int, int]]]:
    """`final` (a sample's text in its template, `prompt_text`) -> its token ids and their character offsets, as the
    model is served (`FlamingoProcessor.token_ids`: no special token the tokenizer appends), except that each
    special-token string the data spelled out (`_stray_specials`) is tokenized on its own as plain text. A slow
    tokenizer (no offsets) tokenizes the text as the processor does, offsets empty."""
    tokenizer = processor.tokenizer
    if END_OF_CHUNK_TOKEN in final and not has_token(tokenizer, END_OF_CHUNK_TOKEN):
        raise ValueError(f"{END_OF_CHUNK_TOKEN} in a sequence for a tokenizer without it (builder bug: "
                         "DatasetSpec.chunk_end writes the chunk end)")
    if not tokenizer.is_fast:
        return processor.token_ids(final, special_tokens=special), []
    encoded = tokenizer(final, add_special_tokens=special, split_special_tokens=False, return_offsets_mapping=True,
                        verbose=False)
    ids, offsets = list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]
    if special:  # as `token_ids`: not what the tokenizer appends after the text (the data writes its own EOS)
        keep = len(ids) - processor.appended(ids)
        ids, offsets = ids[:keep], offsets[:keep]
    for k in reversed(_stray_specials(processor, final, ids, offsets, answer_ends)):
        s, e = offsets[k]
        plain = tokenizer(final[s:e], add_special_tokens=False, split_special_tokens=True,
                          return_offsets_mapping=True, verbose=False)
        ids[k:k + 1] = plain["input_ids"]
        offsets[k:k + 1] = [(s + a, s + b) for a, b in plain["offset_mapping"]]
    return ids, offsets


def tokenize(processor: FlamingoProcessor, text: str, max_tokens: Optional[int]) -> list[int]:
    """A sample's text in the processor's template (`prompt_text`: IDEFICS's BOS and image wrappers, as served)."""
    ids, _ = data_token_ids(processor, *processor.prompt_text(text))
    return truncate_ids(ids, max_tokens, processor.media_token_id, processor.media_marker_ids) if max_tokens else ids


def tokenize_spans(processor: FlamingoProcessor, text: str, spans: Sequence[tuple[int, int]],
                   max_tokens: Optional[int]) -> tuple[list[int], list[int]]:
    """A prompt in the processor's template (`prompt_text`, as served) -> (ids, labels): the ids of the tokens that
    overlap a character span of `spans` as labels, -100 elsewhere (and on `<image>`); cut to `max_tokens`."""
    final, special = processor.prompt_text(text)
    located = []
    for a, b in spans:  # where each span sits in the string the template tokenizes
        start = len(processor.prompt_text(text[:a])[0])
        if final[start:start + b - a] != text[a:b]:
            raise ValueError(f"the {processor.template} template moves trained text: cannot label it")
        located.append((start, start + b - a))
    if not processor.tokenizer.is_fast:
        raise ValueError("conversations need a fast tokenizer (its offsets place the answers' tokens)")
    ids, offsets = data_token_ids(processor, final, special, answer_ends={b for _, b in located})
    media_id = processor.media_token_id
    labels = [tok if tok != media_id and e > s and any(s < b and e > a for a, b in located) else IGNORE_INDEX
              for tok, (s, e) in zip(ids, offsets)]
    if max_tokens:
        ids = truncate_ids(ids, max_tokens, media_id, processor.media_marker_ids)
    return ids, labels[:len(ids)]


def media_key(ref: MediaRef, fps: float, max_frames: int) -> Optional[tuple]:
    """The media cache's key: the file and the frame sampling (an image file may hold an animation); None for media
    with no stable name."""
    return (ref.cache_key, fps, max_frames) if ref.cache_key else None


def check_references(example: Example, num_references: int) -> None:
    """SkipSample (`bad_record`) for an example whose text writes `<imagek>` for an image the model has no reference
    token for (k >= `num_references`, or a leading zero), or that declared more images than it has reference tokens
    for: the processor refuses both in a prompt (`references.check_reference_index`), and the tag, tokenized as
    characters, would be trained as text."""
    tags = [m.group(1) for m in REFERENCE.finditer(example.text)]
    if example.declared_images > num_references:  # the first declared image without a token, as the prompt's error
        tags.insert(0, str(num_references))
    for digits in tags:
        try:
            check_reference_index(digits, num_references)
        except ValueError as e:
            raise SkipSample("bad_record", f"{example.key}: {e}") from e


def example_ids_truncated(processor: FlamingoProcessor, example: Example, max_tokens: Optional[int]
                          ) -> tuple[list[int], list[int], bool]:
    """An example's token ids and labels, cut to `max_tokens`, and whether the cut took tokens (the end of the text:
    a caption's or an answer's end, never trained). SkipSample for a reference the model has no token for
    (`check_references`) and when a conversation has no answer left."""
    check_references(example, processor.num_references)
    media_id, markers = processor.media_token_id, processor.media_marker_ids
    if example.trained_spans is None:
        whole = tokenize(processor, example.text, None)
        ids = truncate_ids(whole, max_tokens, media_id, markers) if max_tokens else whole
        return ids, make_labels(ids, media_id, markers), max_tokens is not None and 0 < max_tokens < len(whole)
    whole, labels = tokenize_spans(processor, example.text, example.trained_spans, None)
    ids = truncate_ids(whole, max_tokens, media_id, markers) if max_tokens else whole
    labels = labels[:len(ids)]
    if all(label == IGNORE_INDEX for label in labels):
        raise SkipSample("empty_text", f"{example.key}: no answer token within max_tokens={max_tokens}")
    return ids, labels, max_tokens is not None and 0 < max_tokens < len(whole)


def encode_example(example: Example, processor: FlamingoProcessor, *, max_tokens: Optional[int], fps: float = 1.0,
                   max_frames: int = 8, cache: Optional[TensorCache] = None, text_only: bool = False) -> Encoded:
    """Tokenize + truncate, then load and preprocess only the media whose `<image>` survived the truncation
    (or take them from `cache`, keyed by file and frame sampling). text_only: an example without any medium is kept
    (one whose media the truncation cut is still skipped)."""
    media_id = processor.media_token_id
    ids, labels, truncated = example_ids_truncated(processor, example, max_tokens)
    n = ids.count(media_id)
    if n == 0 and not (text_only and not example.media):
        raise SkipSample("no_matched_image", f"{example.key}: no <image> left within max_tokens={max_tokens}")
    if n > len(example.media):
        raise ValueError(f"{example.key}: {n} <image> tokens but {len(example.media)} media (builder bug)")
    refs = example.media[:n]
    keys = [media_key(ref, fps, max_frames) if cache is not None else None for ref in refs]
    media: list[Optional[torch.Tensor]] = [cache.get(k) if k is not None else None for k in keys]
    todo = [i for i, m in enumerate(media) if m is None]
    if todo:
        frames = [refs[i].load(fps=fps, max_frames=max_frames) for i in todo]
        flat = [f for medium in frames for f in medium]
        pixels = processor.image_processor(images=flat, return_tensors="pt")["pixel_values"]  # (sum F, C, H, W)
        for i, medium in zip(todo, torch.split(pixels, [len(m) for m in frames])):  # (F, C, H, W) each
            media[i] = medium
            if keys[i] is not None:
                cache.put(keys[i], medium)
    return Encoded(example.key, ids, labels, media, example.text, truncated)


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: sample indices grouped into rows of at most `capacity` tokens (a longer sample gets a
    row of its own). Deterministic; each row lists its samples in their original order."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep their order
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return [sorted(row) for row in rows]


def collate(samples: Sequence[Encoded], processor: FlamingoProcessor, padding_side: str = "right",
            pack_tokens: int = 0) -> dict[str, Any]:
    """-> `input_ids (B, T)`, `attention_mask (B, T)`, `labels (B, T)`, `images (B, N, F, C, H, W)`, `num_media (B,)`,
    `num_frames (B, N)`, `keys` (list of sample keys), `truncated` (the keys of the samples cut by max_tokens:
    `DatasetSource` counts them and takes the entry out of the batches it yields).

    pack_tokens > 0: the samples are packed into rows of up to that many tokens (`pack_rows`, right padding), and the
    batch also holds `document_ids (B, T)`: the sample's place in its row, -1 on padding (`Flamingo.forward`). B is
    then the number of rows; `keys` lists the samples row by row."""
    if pack_tokens > 0:
        if padding_side != "right":
            raise ValueError("packed rows are right-padded: pack_tokens needs padding_side 'right'")
        groups = pack_rows([len(s.input_ids) for s in samples], pack_tokens)
    else:
        groups = [[i] for i in range(len(samples))]
    rows = [[samples[i] for i in group] for group in groups]
    out = processor.pad([[t for s in row for t in s.input_ids] for row in rows], padding_side)
    length = out["input_ids"].shape[1]
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for b, row in enumerate(rows):
        row_labels = [t for s in row for t in s.labels]
        sl = slice(length - len(row_labels), length) if padding_side == "left" else slice(0, len(row_labels))
        labels[b, sl] = torch.tensor(row_labels, dtype=torch.long)
    out["labels"] = labels
    if pack_tokens > 0:  # right-padded rows: each sample's place in its row, -1 on padding
        out["document_ids"] = torch.full((len(rows), length), -1, dtype=torch.long)  # (B, T)
        for b, row in enumerate(rows):
            lengths = torch.tensor([len(s.input_ids) for s in row])
            out["document_ids"][b, :int(lengths.sum())] = torch.repeat_interleave(torch.arange(len(row)), lengths)
    out.update(processor.batch_media([[m for s in row for m in s.media] for row in rows]))
    out["keys"] = [s.key for row in rows for s in row]
    out["truncated"] = [s.key for row in rows for s in row if s.truncated]
    return out
