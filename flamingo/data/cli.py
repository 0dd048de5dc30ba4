"""`flamingo data inspect` and `flamingo data pack` (added to the main CLI by `add_data_subcommands`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING, Any, Optional

from ..config import PROCESSOR_CONFIG_NAME
from ..runtime.arguments import non_negative_int, positive_int
from .kinds import KINDS

if TYPE_CHECKING:  # the loaders (transformers, torch) are imported when a command runs, not for its --help
    from ..processing import FlamingoProcessor


def _parse_options(items: Optional[list[str]]) -> dict[str, Any]:
    """`--option key=value` items -> {key: value}, each value read as YAML (`max_tokens=64` an integer)."""
    import yaml

    options: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--option {item!r} is not key=value")
        key, value = item.split("=", 1)
        try:
            options[key] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or type(e).__name__
            raise ValueError(f"--option {item!r}: the value is not valid YAML ({problem}); quote text: "
                             f"'{key}=\"...\"'") from None
    return options


def _check_out_dir(out: str) -> None:
    """`inspect --out`: made before the records are read, so that a path that cannot be a directory (an existing
    file, a path through one) is said at once, not after the whole pass."""
    from ..runtime.checkpoint_io import check_named

    check_named(out, "--out")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out!r} is a file: name a directory for summary.json and contact_sheet.png")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out!r} cannot be a directory: {e.strerror or e}") from None


def load_tokenizing_processor(directory: str) -> "FlamingoProcessor":
    """A saved processor / Flamingo model directory, or any HF tokenizer directory (Flamingo tokens added)."""
    from ..processing import FlamingoProcessor, add_flamingo_tokens, load_tokenizer

    if os.path.isfile(os.path.join(directory, PROCESSOR_CONFIG_NAME)):
        return FlamingoProcessor.from_pretrained(directory)
    tokenizer = load_tokenizer(directory)
    add_flamingo_tokens(tokenizer)
    return FlamingoProcessor(tokenizer, image_processor=None)  # inspect only tokenizes


def chosen_kind(kind: Optional[str], path: str, options: Optional[dict[str, Any]] = None) -> str:
    """`--kind`, else the kind `detect_kind` tells from `path`'s first records, said on stdout; a ValueError naming
    the kinds it could not tell apart (exit code 2) otherwise. `inspect` and `pack` both choose so."""
    if kind is not None:
        return kind
    from .inspect import detect_kind

    kind = detect_kind(path, options=options)
    print(f"kind: {kind} (detected from the files; --kind chooses)")
    return kind


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .inspect import inspect_dataset, write_report

    options = _parse_options(args.option)
    if args.tokenizer_from:  # a missing path or a file, said before the records are read
        from ..runtime.hub import local_or_hub

        local_or_hub(args.tokenizer_from, "--tokenizer-from")
    if args.out is not None:
        _check_out_dir(args.out)
    kind = chosen_kind(args.kind, args.path, options)
    processor = load_tokenizing_processor(args.tokenizer_from) if args.tokenizer_from else None
    report = inspect_dataset(args.path, kind, processor, options=options, limit=args.limit, show=args.show)
    print(report.table())
    if args.out:
        written = write_report(report, args.out)
        print(f"wrote {written['summary']} and {written['contact_sheet']}")
    print(json.dumps(report.to_dict()))
    return 0


def _cmd_pack(args: argparse.Namespace) -> int:
    from .pack import pack

    # an image folder holds pairs; a table's rows are read as `inspect` reads them
    kind = args.kind or ("pairs" if args.images is not None else chosen_kind(None, args.source))
    result = pack(args.out, kind=kind, source=args.source, images=args.images, image_dir=args.image_dir,
                  shard_size=args.shard_size)
    print(f"packed {result['samples']} samples into {len(result['shards'])} shard(s); skipped {result['skipped']}"
          + (f"; dropped {result['dropped_images']} missing image(s) of packed documents"
             if result["dropped_images"] else ""))
    if not result["samples"]:
        print(f"error: no sample could be packed (skipped, by reason: {result['skipped']})", file=sys.stderr)
        return 1
    print(f"dataset path: {result['path']}")
    return 0


def add_data_subcommands(subparsers: Any) -> None:
    data = subparsers.add_parser("data", help="inspect training data, pack it into WebDataset shards")
    sub = data.add_subparsers(dest="data_command", required=True)

    insp = sub.add_parser("inspect", help="count documents/images/frames/tokens/skips and draw a contact sheet")
    insp.add_argument("path", help="a file, a directory, or a brace pattern (shard-{000000..000009}.tar)")
    insp.add_argument("--kind", choices=KINDS, default=None,
                      help="the dataset's kind (default: detected from its records; docs/data.md has the formats)")
    insp.add_argument("--tokenizer-from", default=None,
                      help="a saved Flamingo model/processor or HF tokenizer directory (counts tokens, truncates)")
    insp.add_argument("--out", default=None, help="directory for summary.json and contact_sheet.png")
    insp.add_argument("--option", action="append", help="dataset option key=value (e.g. image_dir=imgs), repeatable")
    insp.add_argument("--limit", type=positive_int, default=None,
                      help="read at most this many records (>= 1; default: all)")
    insp.add_argument("--show", type=non_negative_int, default=6,
                      help="samples on the contact sheet (>= 0; 0: none drawn)")
    insp.set_defaults(func=_cmd_inspect)

    pk = sub.add_parser("pack", help="JSONL/CSV (+ media files) or an image folder -> WebDataset tar shards")
    src = pk.add_mutually_exclusive_group(required=True)
    src.add_argument("--from", dest="source", help="a .jsonl/.csv/.json table (paths relative to its directory)")
    src.add_argument("--images", help="a folder of images, each with a same-name .txt caption (pairs)")
    pk.add_argument("--kind", choices=KINDS, default=None,
                    help="the rows' kind (default: detected from the table's records, as `inspect` does; pairs for "
                         "--images)")
    pk.add_argument("--image-dir", default=None, help="interleaved: where image_name files are (default: the table's)")
    pk.add_argument("--out", required=True, help="output directory or pattern like out/shard-%%06d.tar")
    pk.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    pk.set_defaults(func=_cmd_pack)
