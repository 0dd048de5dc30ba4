"""A dataset's resolved settings (kind, files, options with defaults) and its record -> sample function."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from ..chat import FLAMINGO, ChatFormat, chat_format_for
from ..config import END_OF_CHUNK_TOKEN
from ..processing import FlamingoProcessor
from ..runtime.lru import TensorCache
from ..runtime.text import valid_text
from .chat import chat_example
from .interleaved import interleaved_example
from .kinds import check_stream_options, resolve_options
from .pairs import pair_example
from .remote import ShardFetcher, default_cache_dir, is_remote
from .sequence import Encoded, Example, encode_example, has_token
from .sources import RawRecord, expand_path


@dataclass
class DatasetSpec:
    """Everything a stream needs to turn raw records into samples: picklable (sent to DataLoader workers)."""

    name: str
    kind: str
    files: list[str]
    batch_size: int
    options: dict[str, Any]
    processor: Optional[FlamingoProcessor]  # None: inspect without a tokenizer (no tokens, no pixels)
    media_cache: Optional[TensorCache] = None  # options.cache_media_mib > 0; pickles empty (one per worker process)
    fetcher: Optional[ShardFetcher] = None  # remote shards' cache (options.remote_cache_*); None: no remote files
    chat: ChatFormat = FLAMINGO  # conversations are written in the processor's chat format (resolved once)
    # How videos and animated images are sampled: options fps / max_frames where the kind has them, else the
    # processor's (`video_fps`, `max_frames`), as the model is evaluated and served.
    fps: float = 1.0
    max_frames: int = 8

    @classmethod
    def create(cls, name: str, kind: str, path: str, batch_size: int, options: Optional[dict[str, Any]],
               processor: Optional[FlamingoProcessor], vocab: Optional[int] = None) -> "DatasetSpec":
        """vocab: the rows of the trained model's embedding, which decide its chat format (`chat_format_for`: an
        IDEFICS model without a row for `<end_of_utterance>` ends turns with the line break alone, as it is served);
        None: the tokenizer's size (`flamingo data inspect`, which has no model)."""
        if batch_size < 1:
            raise ValueError(f"dataset {name!r}: batch_size must be >= 1, got {batch_size}")
        resolved = resolve_options(kind, options)
        check_stream_options(name, resolved)
        fps, max_frames = media_sampling(name, resolved, processor)
        cache = TensorCache.of_mib(float(resolved["cache_media_mib"])) if processor is not None else None
        files = expand_path(path)
        fetcher = remote_fetcher(files, resolved)
        chat = chat_format_for(processor, vocab) if processor is not None else FLAMINGO
        return cls(name, kind, files, batch_size, resolved, processor, cache, fetcher, chat, fps, max_frames)

    @property
    def tar_needs(self) -> Optional[str]:
        """The member a tar sample of this kind must have (`read_records`): documents and conversations are JSON."""
        return "json" if self.kind in ("interleaved", "chat") else None

    @property
    def eos(self) -> str:
        if self.processor is None or not self.options["append_eos"]:
            return ""
        return self.processor.tokenizer.eos_token or ""

    @property
    def chunk_end(self) -> str:
        """What closes a chunk (a caption, an image's text in a document): `<|endofchunk|>`, as OpenFlamingo trains,
        where the tokenizer holds it. A converted IDEFICS model's has none, and IDEFICS's own pretraining
        (HuggingFaceM4's m4/training/packing.py) writes nothing between an image's text and the next image and ends
        each pair and document with EOS (`append_eos`): so nothing, never the marker's characters."""
        if self.processor is None or has_token(self.processor.tokenizer, END_OF_CHUNK_TOKEN):
            return END_OF_CHUNK_TOKEN
        return ""

    def example(self, record: RawRecord) -> Example:
        """Parse a record (no media decoded); raises SkipSample. Its text is valid Unicode (`valid_text`) and closes
        its chunks with `chunk_end` (the builders write `<|endofchunk|>`; data text never holds it: `clean_text`,
        and conversations refuse it)."""
        example = self._build(record)
        example.text = valid_text(example.text)
        if self.kind != "chat" and self.chunk_end != END_OF_CHUNK_TOKEN:
            example.text = example.text.replace(END_OF_CHUNK_TOKEN, self.chunk_end)
        return example

    def _build(self, record: RawRecord) -> Example:
        o = self.options
        if self.kind == "interleaved":
            return interleaved_example(record, similarity_threshold=float(o["similarity_threshold"]),
                                       max_images=int(o["max_images"]), image_dir=o["image_dir"], eos=self.eos)
        if self.kind == "chat":  # written as the model is served
            return chat_example(record, self.chat, eos=self.eos)
        return pair_example(record, video=self.kind == "video", eos=self.eos)

    def encode(self, record: RawRecord) -> Encoded:
        """Parse, tokenize, truncate, load and preprocess media; raises SkipSample."""
        assert self.processor is not None, "encoding needs a processor"
        o = self.options
        return encode_example(self.example(record), self.processor, max_tokens=int(o["max_tokens"]),
                              fps=self.fps, max_frames=self.max_frames,
                              cache=self.media_cache, text_only=bool(o.get("text_only", False)))


def media_sampling(name: str, options: dict[str, Any], processor: Optional[FlamingoProcessor]) -> tuple[float, int]:
    """(fps, max_frames) a dataset's videos and animated images are read with: its options `fps` and `max_frames`
    (the `video` and `chat` kinds'; None: the processor's, filled into `options`), else the processor's `video_fps`
    and `max_frames` (1.0 and 8 without one). A `max_frames` over the processor's is refused here: the model has
    time embeddings for that many frames only, and its first batch with a longer video would fail."""
    default_fps = processor.video_fps if processor is not None else 1.0
    default_frames = processor.max_frames if processor is not None else 8
    asked = options.get("max_frames")
    if asked is not None and processor is not None and asked > processor.max_frames:
        raise ValueError(f"dataset {name!r}: option max_frames={asked} is more than the processor's max_frames="
                         f"{processor.max_frames} (the model's time embeddings): leave it out or set at most that")
    for option, default in (("fps", default_fps), ("max_frames", default_frames)):
        if option in options and options[option] is None:
            options[option] = default
    return float(options.get("fps", default_fps)), int(options.get("max_frames", default_frames))


def remote_fetcher(files: Sequence[str], options: dict[str, Any]) -> Optional[ShardFetcher]:
    """The cache that the remote ones of `files` are fetched to, as resolved `options` name it
    (`remote_cache_dir`, `remote_cache_gb`); None when no file is remote."""
    if not any(is_remote(f) for f in files):
        return None
    return ShardFetcher(options["remote_cache_dir"] or default_cache_dir(),
                        int(float(options["remote_cache_gb"]) * 2**30))
