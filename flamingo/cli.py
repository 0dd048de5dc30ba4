"""The `flamingo` command. Thin: each subcommand parses arguments and calls the library (`demo` hands over to
the demo package beside it). Subcommands import their part of the library when they run, so that `flamingo --help`
and one subcommand do not load them all; the CLI is the top layer, so these imports can form no cycle."""

from __future__ import annotations

import argparse
import codecs
import io
import json
import math
import os
import sys
import time
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

from .config import QUANTIZE_MODES
from .runtime.arguments import (
    allowed_host,
    host_name,
    non_empty_key,
    non_negative_float,
    non_negative_int,
    port_number,
    positive_float,
    positive_int,
)
from .runtime.dtypes import DTYPE_NAMES, torch_dtype
from .runtime.launch import quiet_cpp_notices_off_rank_0
from .runtime.quiet import quiet_irrelevant_warnings, quiet_transformers

if TYPE_CHECKING:
    from .chat import ChatFormat

MODEL_HELP = "a directory written by save_pretrained, or a Hub repository holding one (org/name)"
ANY_MODEL_HELP = (MODEL_HELP + "; or an IDEFICS (or its PEFT adapter), Otter or published OpenFlamingo checkpoint, "
                  "converted in memory on each load (docs/convert.md)")
REVISION_HELP = "with a Hub repository as --model: the branch, tag or commit to load (default: main)"


def check_device(name: str) -> None:
    """`--device` usable here (`runtime.device.check_device`, imported late: torch loads only for commands)."""
    from .runtime.device import check_device as check

    check(name)


@contextmanager
def needs_extra(command: str, extra: str) -> Iterator[None]:
    """Imports inside that miss a third-party package raise a ValueError (the CLI's one-line error) naming it and
    `extra`, the extra of pyproject.toml that installs it (docs/install.md's table), as `--quantize-frozen` does
    without torchao. Our own modules missing (a broken install) keep their traceback."""
    try:
        yield
    except ModuleNotFoundError as e:
        package = (e.name or "").partition(".")[0]
        if not package or package in ("flamingo", "flamingo_demo"):
            raise
        raise ValueError(f"{command} needs {package}: pip install 'flamingo-vlm[{extra}]'") from e


def check_output_file(output: str, source: Optional[str] = None) -> None:
    """Before any work: `output` is a file that can be written (its directory made if missing), named, not a
    directory and not `source` (the input it is computed from: replacing it would lose the input)."""
    from .runtime.checkpoint_io import check_named

    check_named(output, "--output")
    if os.path.isdir(output):
        raise ValueError(f"--output {output!r} is a directory: name the file to write")
    if source is not None and os.path.exists(output) and os.path.samefile(output, source):
        raise ValueError(f"--output {output!r} is the input file: write the results elsewhere")
    directory = os.path.dirname(os.path.abspath(output))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--output {output!r}: cannot make its directory ({e})") from None
    if not os.access(directory, os.W_OK):
        raise ValueError(f"--output {output!r}: its directory {directory!r} is not writable")


def check_outside_model(target: str, model: str, what: str) -> None:
    """Refuse `target` (`what`, a path the command writes) inside a local `model` directory: a file written there
    may replace one of the model's, and `flamingo push` uploads whatever the directory holds. A Hub name is not
    checked."""
    if not os.path.isdir(model):
        return
    out, src = os.path.realpath(target), os.path.realpath(model)
    if os.path.commonpath([out, src]) == src:
        raise ValueError(f"{what} {target!r} is inside the model directory {model!r}: put it elsewhere (a file "
                         "there may replace one of the model's, and `flamingo push` uploads the whole directory)")


def _cmd_tiny(args: argparse.Namespace) -> int:
    """Build a small Flamingo from random backbones and run one interleaved prompt through it."""
    import torch

    from .tiny import random_image, tiny_flamingo

    start = time.perf_counter()
    # random weights: open the gates so that the images visibly matter
    model, processor = tiny_flamingo(args.lm, "clip", gates=0.5, seed=args.seed, xattn_every=args.xattn_every)
    prompt = ("<image>Question: what is this? Short answer: a red circle.<|endofchunk|>"
              "<image>Question: and this? Short answer:")
    images = [random_image(0), [random_image(i) for i in range(1, 4)]]  # a still and a 3-frame video
    batch = processor(prompt, images=images)
    with torch.no_grad():
        out = model(**batch, labels=batch["input_ids"])
        other = model(**processor(prompt, images=[random_image(0), [random_image(9)] * 3])).logits
    second = int((batch["input_ids"][0] == processor.media_token_id).nonzero()[1])
    same_before = bool(torch.equal(out.logits[0, :second], other[0, :second]))
    changed_after = bool(not torch.allclose(out.logits[0, second:], other[0, second:]))
    summary = {
        "lm": args.lm, "tokens": batch["input_ids"].shape[1], "images": list(batch["images"].shape),
        "visual_tokens": list(out.visual_tokens.shape), "logits": list(out.logits.shape),
        "loss": round(float(out.loss), 4), "xattn_layers": model.xattn_layer_indices,
        "trainable_params": sum(p.numel() for p in model.trainable_parameters().values()),
        "tokens_before_2nd_image_unchanged_when_it_changes": same_before,
        "tokens_after_2nd_image_changed": changed_after,
        "seconds": round(time.perf_counter() - start, 2),
    }
    print(f"prompt: {prompt}")
    for key, value in summary.items():
        print(f"  {key:52s} {value}")
    print(json.dumps(summary))
    return 0 if same_before and changed_after else 1


def _check_convert_out(args: argparse.Namespace, *sources: Optional[str]) -> None:
    """Before a conversion runs: `--out` (and `--backbones`) can be written (new, empty, or an earlier write of the
    same kind: `save_pretrained` and `write_backbones` replace them whole), apart from each other and around no
    local source."""
    from .config import CONFIG_NAME
    from .convert.checkpoints import check_backbones_dir
    from .model.flamingo import kept_on_save
    from .runtime.checkpoint_io import check_apart, check_replaceable

    check_replaceable(args.out, CONFIG_NAME, "a saved Flamingo model")
    backbones = getattr(args, "backbones", None)
    if backbones:
        check_backbones_dir(backbones)
        out, written = os.path.realpath(args.out), os.path.realpath(backbones)
        if os.path.commonpath([out, written]) in (out, written):  # either write would replace the other
            raise ValueError(f"--backbones {backbones!r} and --out {args.out!r} overlap: give them separate "
                             "directories")
    for source in sources:
        if source is not None:
            check_apart(args.out, str(source), "--out", inside=False)
            if backbones:
                check_apart(backbones, str(source), "--backbones", inside=False)
    kept_on_save(args.out, with_processor=True)  # files of the user's an earlier save's directory holds: refused now


def _cmd_convert_open_flamingo(args: argparse.Namespace) -> int:
    from .convert import PUBLISHED_V1, convert_openflamingo, published_openflamingo

    _check_convert_out(args, args.checkpoint, args.vision, args.lm, args.tokenizer)
    if (args.model is None) == (args.checkpoint is None):
        raise ValueError("pass --model NAME (a published OpenFlamingo) or --checkpoint FILE with --vision and --lm")
    if args.revision is not None and args.model is None:
        raise ValueError("--revision is a version of --model's Hub repository; --checkpoint is a file: drop it")
    if args.model in PUBLISHED_V1 and args.lm is None:
        raise ValueError(f"{args.model} sits on LLaMA-7B (v1), which has no canonical hub name: pass --lm with a "
                         "LLaMA-7B directory or mirror in Hugging Face format")
    checkpoint, vision, lm = args.checkpoint, args.vision, args.lm
    if args.model is not None:
        checkpoint, published_vision, published_lm = published_openflamingo(args.model, revision=args.revision)
        vision, lm = vision or published_vision, lm or published_lm
    elif vision is None or lm is None:
        raise ValueError("--checkpoint needs --vision and --lm (the backbones the checkpoint was trained on)")
    model, processor = convert_openflamingo(checkpoint, vision, lm, args.tokenizer,
                                            attend_next_image=args.v1 or args.model in PUBLISHED_V1,
                                            torch_dtype=torch_dtype(args.dtype) if args.dtype else None)  # read in it
    model.save_pretrained(args.out, trained_only=args.trained_only, processor=processor)
    print(f"wrote {args.out} (xattn before layers {model.xattn_layer_indices})")
    return 0


def _cmd_convert_mmgpt(args: argparse.Namespace) -> int:
    from .convert.mmgpt import CLIP_VIT_L, MMGPT_LORA_URL, convert_mmgpt, published_base
    from .model.cast import to_dtype

    _check_convert_out(args, args.finetune, args.base, args.lm, args.vision, args.tokenizer)
    model, processor = convert_mmgpt(args.finetune or MMGPT_LORA_URL, published_base(args.base), args.lm,
                                     args.tokenizer, vision=args.vision or CLIP_VIT_L, merge_lm_lora=args.merge_lora)
    if args.dtype:
        to_dtype(model, torch_dtype(args.dtype))  # as every converter casts: the LM's rotary frequencies stay float32
    model.save_pretrained(args.out, trained_only=args.trained_only, processor=processor)
    adapters = "merged into the LM" if args.merge_lora else f"kept as lm_lora {model.config.lm_lora}"
    print(f"wrote {args.out} (Multimodal-GPT: the LM's LoRA adapters {adapters})")
    return 0


def _cmd_convert_whole(args: argparse.Namespace) -> int:
    """IDEFICS and Otter: checkpoints holding their backbones, written whole or once under --backbones."""
    from .convert import from_idefics, from_otter, write_backbones

    if args.trained_only and not args.backbones:
        raise ValueError("--trained-only needs --backbones DIR (where the vision tower and LM are written once)")
    _check_convert_out(args, args.model, args.tokenizer, getattr(args, "adapter", None))
    dtype = torch_dtype(args.dtype) if args.dtype else None  # read in it: no second copy in another dtype
    if args.source == "idefics":
        model, processor = from_idefics(args.model, args.tokenizer, adapter=args.adapter, revision=args.revision,
                                        torch_dtype=dtype)
    else:
        model, processor = from_otter(args.model, args.tokenizer, revision=args.revision, torch_dtype=dtype)
    if args.backbones:
        write_backbones(model, processor, args.backbones)
    model.save_pretrained(args.out, trained_only=args.trained_only, processor=processor)
    print(f"wrote {args.out} ({args.source}: blocks before layers {model.xattn_layer_indices})")
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    from .hub import push_directory

    url = push_directory(args.model, args.repo, private=args.private or None, revision=args.revision,
                         commit_message=args.message, replace_card=args.replace_card, results=args.results,
                         train_config=args.train_config)
    print(f"pushed {args.model} to {args.repo}: {url}")
    print(f"load it with load_pretrained({args.repo!r}) or `flamingo serve --model {args.repo}`")
    return 0


def _cmd_export_open_flamingo(args: argparse.Namespace) -> int:
    from .build import load_pretrained
    from .convert.to_openflamingo import check_openflamingo_out, save_openflamingo_checkpoint
    from .runtime.checkpoint_io import check_apart, check_named

    check_named(args.out, "--out")
    check_openflamingo_out(args.out)  # before the model loads
    check_apart(args.out, args.model, "--out")
    # the trained parts, never the frozen weights
    model, processor = load_pretrained(args.model, revision=args.revision, quantize_frozen="none")
    recipe = save_openflamingo_checkpoint(model, args.out, processor)  # processor: refusals name tokens by text
    print(f"wrote {args.out} and {args.out}.json (how OpenFlamingo loads it):")
    print(json.dumps(recipe, indent=2))
    return 0


def _cmd_export_idefics(args: argparse.Namespace) -> int:
    from .build import load_pretrained
    from .convert.to_idefics import check_idefics_out, save_idefics
    from .runtime.checkpoint_io import check_apart

    check_idefics_out(args.out)  # before the model loads
    check_apart(args.out, args.model, "--out")
    model, processor = load_pretrained(args.model, revision=args.revision, quantize_frozen="none")  # float weights
    if model.config.lm_lora is not None:  # the LM is written whole: its adapters merged into it
        model.merge_lora()
    config = save_idefics(model, processor, args.out)
    print(f"wrote {args.out}: IdeficsForVisionText2Text.from_pretrained / IdeficsProcessor.from_pretrained load it "
          f"(cross_layer_interval {config.cross_layer_interval}, alpha_type {config.alpha_type})")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    """Few-shot prompt + media -> streamed continuation."""
    import torch
    from transformers import TextStreamer

    from .convert.auto import load_model

    for name in ("max_new_tokens", "num_beams", "num_return_sequences"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    # transformers says so only after the load: beam search, sampled or not, returns at most its beams
    if (args.num_beams > 1 or not args.sample) and args.num_return_sequences > args.num_beams:
        raise ValueError(f"--num-return-sequences {args.num_return_sequences} is more than --num-beams "
                         f"{args.num_beams}: " + ("the sequences are the best beams (raise --num-beams)"
                                                  if args.num_beams > 1 else
                                                  "without --sample the sequences are the best beams (raise "
                                                  "--num-beams, or add --sample)"))
    if not args.sample and (args.temperature != 1.0 or args.top_k is not None or args.top_p is not None):
        raise ValueError("--temperature, --top-k and --top-p shape sampling: add --sample (without it the "
                         "continuation is greedy or beam search)")
    # top-p 0: transformers' nucleus keeps its minimum, the likeliest token alone, as the server reads top_p 0
    if not 0 < args.temperature < math.inf or (args.top_p is not None and not 0 <= args.top_p <= 1) or \
            (args.top_k is not None and args.top_k < 1):  # (NaN fails too)
        raise ValueError("sampling needs a finite --temperature > 0, --top-p in [0, 1] and --top-k >= 1")
    from .model.generation import MIN_REPETITION_PENALTY

    if not MIN_REPETITION_PENALTY <= args.repetition_penalty < math.inf:  # generate's own bound, before the load
        raise ValueError(f"--repetition-penalty must be a finite number >= {MIN_REPETITION_PENALTY:g} (1: none), got "
                         f"{args.repetition_penalty}")
    check_device(args.device)
    model, processor = load_model(args.model, torch_dtype=torch_dtype(args.dtype) if args.dtype else None,
                                  device=args.device, quantize_frozen=args.quantize_frozen, revision=args.revision)
    prompt, references = args.prompt, args.image_references  # None: as the processor was saved
    fmt: Optional[ChatFormat] = None  # --chat: the model's conversation format
    if args.chat and references:
        raise ValueError("--chat writes each --image as <image> in the model's chat format: it takes no declared-image"
                         " prompt (--image-references)")
    if args.chat:  # one user turn, its media first, in the model's chat format (flamingo/chat.py)
        from .chat import BLANKS, Turn, chat_format_for, control_tokens

        fmt = chat_format_for(processor, model.lm.get_output_embeddings().weight.shape[0])
        marker = fmt.first_reserved(prompt)
        if marker is not None:
            raise ValueError(f"with --chat the prompt is the question alone: it may not contain {marker} (the "
                             f"{fmt.name} format writes its own markers, and one <image> per --image)")
        control = fmt.refused(control_tokens(processor), "user")  # what the server refuses in a user's text
        token = next((t for t in control if t in prompt), None)
        if token is not None:
            raise ValueError(f"with --chat the prompt is the question alone: it may not contain {token} "
                             f"({control[token]}): the tokenizer would read it as that token, not as text (the server "
                             "refuses it in a user's message too)")
        turns = [Turn("user", ("<image>",) * len(args.image or []) + (prompt,))]
        unshown = fmt.unshown_reference(turns)  # `<imagek>` names the k-th --image, as the server reads it
        if unshown is not None:
            raise ValueError(f"with --chat the prompt is the question about the --image files: {unshown[1]}")
        prompt = fmt.render(turns)
        references = False  # the format's <image>s place the media, whatever the processor reads by default
    elif references is None and processor.image_references and "<image>" in prompt:
        raise ValueError("this model's processor reads declared-image prompts (`Image 0 is <image0>. ...`), not "
                         "<image>: declare each --image so, or add --no-image-references to place them with <image>")
    batch = processor(prompt, images=args.image or [], image_references=references)
    if batch["input_ids"].shape[1] == 0:
        raise ValueError("the prompt is empty: nothing to continue")
    inputs = {k: v.to(args.device) for k, v in batch.items() if v is not None}
    if "images" in inputs:
        inputs["images"] = inputs["images"].to(next(model.vision.parameters()).dtype)
    if args.seed is not None:
        torch.manual_seed(args.seed)  # the sampled tokens repeat with the seed
    # one greedy or sampled sequence streams as it comes; beams and several sequences are printed at the end; the
    # processor decodes (its `decode` keeps generated reference tokens `<imageK>`). A chat answer is printed as the
    # server sends it: without the blanks it starts with (the format's gap) and ended at the format's stop strings
    # too (mmgpt's `### End.`, a base IDEFICS's next `\nUser:`).
    stops = fmt.stops if fmt is not None else ()
    streamer = (_chat_streamer(processor, fmt) if fmt is not None else TextStreamer(processor, skip_prompt=True,
                                                                                   skip_special_tokens=True)) \
        if args.num_beams == 1 and args.num_return_sequences == 1 else None
    sampling = dict(do_sample=True, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p) \
        if args.sample else {}
    stopping = dict(stop_strings=list(stops), tokenizer=processor.tokenizer) if stops else {}
    out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                         num_return_sequences=args.num_return_sequences,
                         repetition_penalty=args.repetition_penalty, streamer=streamer, **sampling, **stopping)
    if streamer is None:
        for row in out[:, inputs["input_ids"].shape[1]:]:  # one line per sequence
            text = processor.decode(row)
            print(fmt.cut(text.lstrip(BLANKS)) if fmt is not None else text)
    return 0


def _chat_streamer(processor: Any, fmt: ChatFormat) -> Any:
    """A `TextStreamer` that prints an answer as the server sends it: without the blanks (spaces, tabs) it starts
    with, the gap the format writes before an answer, and up to the first of the chat format `fmt`'s stop strings,
    holding back the end of the text that may still become one (transformers is imported when a chat is generated,
    not with the CLI)."""
    from transformers import TextStreamer

    from .chat import BLANKS

    class ChatStreamer(TextStreamer):
        def __init__(self) -> None:
            super().__init__(processor, skip_prompt=True, skip_special_tokens=True)
            self.pending, self.stopped, self.begun = "", False, False
            # a stop string's start, less its last character
            self.hold = max((len(s) for s in fmt.stops), default=1) - 1

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if not self.begun:  # the answer's leading blanks: the format's gap
                text = text.lstrip(BLANKS)
                self.begun = bool(text)
            if not self.stopped:
                self.pending += text
                answer = fmt.cut(self.pending)
                self.stopped, self.pending = len(answer) < len(self.pending), answer
            end = len(self.pending) if self.stopped or stream_end else max(len(self.pending) - self.hold, 0)
            printed, self.pending = self.pending[:end], self.pending[end:]
            super().on_finalized_text(printed, stream_end)

    return ChatStreamer()


def _engine_and_settings(args: argparse.Namespace) -> tuple[Any, Any]:
    """`serve`'s and `batch`'s engine (the model loaded) and request settings, from their shared options."""
    from .serve.server import build_engine, settings_for

    check_device(args.device)
    if args.batch_dir is not None:
        from .runtime.checkpoint_io import check_named

        check_named(args.batch_dir, "--batch-dir")
        check_outside_model(args.batch_dir, args.model, "--batch-dir")
    settings = settings_for(args.model, api_key=args.api_key, max_body_mb=args.max_body_mb,
                            max_tokens_cap=args.max_tokens_cap, max_images=args.max_images,
                            media_root=args.media_root, allow_remote_media=args.allow_remote_media,
                            allow_private_media_hosts=args.allow_private_media_hosts,
                            max_image_pixels=args.max_image_pixels, max_video_seconds=args.max_video_seconds,
                            model_name=args.model_name,
                            batch_dir=args.batch_dir, batch_concurrency=args.batch_concurrency,
                            max_batch_file_mb=args.max_batch_file_mb, host=getattr(args, "host", None),
                            allowed_hosts=args.allowed_hosts)  # checked before the model loads
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    engine = build_engine(args.model, dtype=torch_dtype(args.dtype) if args.dtype else None,
                          device=args.device, max_batch=args.max_batch, max_queue=args.max_queue,
                          prefill_chunk=args.prefill_chunk, quantize_frozen=args.quantize_frozen,
                          prefix_cache_mib=args.prefix_cache_mib, vision_cache_mib=args.vision_cache_mib,
                          compile=args.compile, revision=args.revision,
                          prefill_batch_tokens=args.prefill_batch_tokens)
    return engine, settings


def _cmd_serve(args: argparse.Namespace) -> int:
    """An OpenAI-compatible server with continuous batching and a web page (docs/serve.md)."""
    import logging

    with needs_extra("flamingo serve", "serve"):
        import uvicorn  # noqa: F401 (serve() imports it once the model is loaded: checked before)

        from .serve.server import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine, settings = _engine_and_settings(args)
    serve(engine, settings, host=args.host, port=args.port, grace=args.grace, root_path=args.root_path.rstrip("/"),
          keep_alive=args.keep_alive, max_connections=args.max_connections)
    return 0


def _cmd_batch(args: argparse.Namespace) -> int:
    """OpenAI Batch API requests (JSONL) -> their responses (JSONL), offline through the server's endpoints."""
    with needs_extra("flamingo batch", "serve"):
        from .serve.batch import run_batch

    if not os.path.isfile(args.input):
        raise FileNotFoundError(f"no input file {args.input!r}")
    check_output_file(args.output, args.input)  # before the model loads and the requests run
    check_outside_model(args.output, args.model, "--output")
    engine, settings = _engine_and_settings(args)
    report = run_batch(engine, settings, args.input, args.output, concurrency=args.concurrency,
                       progress=not args.no_progress)
    summary = report.to_dict()
    for key, value in summary.items():
        print(f"  {key:26s} {value}")
    print(json.dumps(summary))
    print(f"wrote {args.output}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    import logging

    from .train.config import load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_config(args.config, args.overrides)  # before the trainer's imports: a bad config fails at once
    from .train.trainer import Trainer

    quiet_transformers(not config.train.progress)
    trainer = Trainer(config)
    out = trainer.run()
    # stopped by SIGTERM / SIGINT (a checkpoint written, no final model): 143 / 130, so a scheduler requeues it and
    # `flamingo train ... && flamingo eval` does not go on
    code = 128 + trainer.stopped_by if trainer.stopped_by else 0
    if out and trainer.rank == 0:
        print(f"trained model: {out}")
    if trainer.world > 1:  # gloo's threads can abort a finalizing interpreter (runtime/distributed.py)
        from .runtime.distributed import leave_process_group_and_exit

        leave_process_group_and_exit(code)
    return code


def _add_engine_options(p: argparse.ArgumentParser) -> None:
    """The model, engine and request-limit options `serve` and `batch` share."""
    p.add_argument("--model", required=True, help=ANY_MODEL_HELP)
    p.add_argument("--revision", default=None, help=REVISION_HELP)
    p.add_argument("--max-batch", type=positive_int, default=16, help="rows decoded together")
    p.add_argument("--max-queue", type=positive_int, default=64, help="requests waiting for a row; beyond them, 429")
    p.add_argument("--prefill-chunk", type=positive_int, default=64,
                   help="prompt tokens prefilled per decode step: running rows wait at most one chunk")
    p.add_argument("--prefill-batch-tokens", type=non_negative_int, default=None,
                   help="waiting prompts prefilled together in one call of up to this many tokens, padding "
                        "included (default: 4096 on a CPU, 8192 on a GPU; 0: one at a time)")
    p.add_argument("--prefix-cache-mib", type=non_negative_float, default=1024,
                   help="memory for the prefills of earlier prompts, reused by prompts that begin alike (the same "
                        "few-shot demonstrations and images); 0: off")
    p.add_argument("--vision-cache-mib", type=non_negative_float, default=256,
                   help="memory for the vision tower's features of frames seen before (an image shared by a "
                        "prompt list, demonstrations reused across queries, a chat resending its image); 0: off")
    p.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default=None,
                   help="the model's dtype (default: the one it was saved in; a converted model's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true",
                   help="decode steps under torch.compile, CUDA graphs on a GPU (attended positions padded to "
                        "powers of two; each new shape compiles once, seconds to a minute; docs/serve.md)")
    p.add_argument("--quantize-frozen", choices=QUANTIZE_MODES, default=None,
                   help="frozen backbones' linear weights quantized (docs/memory.md); default: the saved config's")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--max-body-mb", type=positive_float, default=20,
                   help="request body size limit; also of a local media file (--media-root) or a download")
    p.add_argument("--max-tokens-cap", type=positive_int, default=512, help="the most max_tokens a request may ask for")
    p.add_argument("--max-images", type=positive_int, default=32, help="images/videos per prompt")
    p.add_argument("--max-image-pixels", type=positive_int, default=20_000_000, help="per image or video frame")
    p.add_argument("--max-video-seconds", type=positive_float, default=600.0,
                   help="longer videos are refused (decoding time grows with the length)")
    p.add_argument("--media-root", default=None,
                   help="local media paths are read only under this directory (which must exist)")
    p.add_argument("--allow-remote-media", action="store_true",
                   help="fetch http(s) media URLs (from public addresses only)")
    p.add_argument("--allow-private-media-hosts", action="store_true",
                   help="with --allow-remote-media: also from loopback, private and link-local addresses")
    p.add_argument("--model-name", default=None,
                   help="the model id clients send (default: the directory's name, or the Hub repository org/name)")


class _Parser(argparse.ArgumentParser):
    """argparse, where a flag's hidden other spelling is no rival in abbreviation matching: `--vision-cache` matches
    eval's `--vision-cache-mib` and its hidden `--vision-cache-mb`, both one setting, and is taken as the shown flag
    rather than refused as ambiguous (naming a spelling --help does not show). Subcommands' parsers are this class."""

    def _get_option_tuples(self, option_string: str) -> list[Any]:
        matches = super()._get_option_tuples(option_string)  # (action, option string, ...) per matching flag
        shown = [m for m in matches if m[0].help != argparse.SUPPRESS]
        if len(shown) == 1 and all(m[0].dest == shown[0][0].dest for m in matches):
            return shown
        return matches


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="flamingo", description="Flamingo visual language models")
    sub = parser.add_subparsers(dest="command", required=True)

    tiny = sub.add_parser("tiny", help="build a small model from random backbones and run an interleaved prompt")
    tiny.add_argument("--lm", default="llama", help="tiny LM architecture (llama, gpt2, gpt_neox, opt, qwen2, ...)")
    tiny.add_argument("--xattn-every", type=int, default=1)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=_cmd_tiny)

    gen = sub.add_parser("generate", help="continue a few-shot prompt with images/videos, streaming tokens")
    gen.add_argument("--model", required=True, help=ANY_MODEL_HELP)
    gen.add_argument("--revision", default=None, help=REVISION_HELP)
    gen.add_argument("--prompt", required=True, help='text with one "<image>" per --image; with --chat, the question')
    gen.add_argument("--chat", action="store_true",
                     help="write --prompt and the --image files as a user turn in the model's chat format (its "
                          "template: flamingo, otter, idefics or mmgpt; docs/serve.md) and answer it, ending the "
                          "answer where the server does (the format's stop strings); on a model with image reference "
                          "tokens the question may name the k-th --image <imagek>, as a user's message may")
    gen.add_argument("--image", action="append", help="image or video file, once per <image>, in order")
    gen.add_argument("--image-references", action=argparse.BooleanOptionalAction, default=None,
                     help="the prompt declares its images (`Image 0 is <image0>`) and refers back to them (`<image0>`);"
                          " the model needs reference tokens (FlamingoConfig.num_image_references). Default: as its "
                          "processor was saved; --no-image-references places the media with <image>")
    gen.add_argument("--max-new-tokens", type=int, default=20)
    gen.add_argument("--num-beams", type=int, default=1)
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy/beam search")
    gen.add_argument("--temperature", type=float, default=1.0, help="with --sample: a finite number > 0")
    gen.add_argument("--top-k", type=int, default=None,
                     help="with --sample: only the k likeliest tokens are drawn from (>= 1; default: all)")
    gen.add_argument("--top-p", type=float, default=None,
                     help="with --sample: only the likeliest tokens whose probabilities reach this sum are drawn from "
                          "(0 to 1; default 1: all; 0: the likeliest token alone, as the server's top_p 0, beam "
                          "sampling keeping a few per beam)")
    gen.add_argument("--repetition-penalty", type=float, default=1.0,
                     help="a finite number >= 0.0001 (1: none; model.generation.MIN_REPETITION_PENALTY)")
    gen.add_argument("--num-return-sequences", type=int, default=1,
                     help="sequences to return (sampled, or the best beams: at most --num-beams, unless --sample "
                          "with one beam)")
    gen.add_argument("--seed", type=int, default=None, help="random seed: --sample gives the same tokens again")
    gen.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default=None,
                     help="the model's dtype (default: the one it was saved in; a converted model's)")
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--quantize-frozen", choices=QUANTIZE_MODES, default=None,
                     help="frozen backbones' linear weights quantized (docs/memory.md); default: the saved config's")
    gen.set_defaults(func=_cmd_generate)

    srv = sub.add_parser("serve", help="an OpenAI-compatible server (continuous batching) with a web page at /")
    _add_engine_options(srv)
    srv.add_argument("--host", type=host_name, default="127.0.0.1",
                     help="interface to bind (default: loopback only; 0.0.0.0: every interface; never empty)")
    srv.add_argument("--port", type=port_number, default=8000, help="0 to 65535 (0: any free port)")
    srv.add_argument("--api-key", type=non_empty_key, default=None,
                     help="require `Authorization: Bearer KEY` on every route but the page (/, /static) and /health "
                          "(an empty key is refused: leave the option out to serve without one)")
    srv.add_argument("--allowed-host", dest="allowed_hosts", action="append", default=[], metavar="NAME",
                     type=allowed_host,
                     help="a Host name the server answers (repeatable): a server bound to loopback answers only "
                          "localhost, 127.0.0.1 and ::1 (a DNS-rebinding page sends its own name), so name the host "
                          "a reverse proxy passes (nginx's `proxy_set_header Host $host`); on another interface, "
                          "giving names limits the server to them and loopback")
    srv.add_argument("--root-path", default="",
                     help="the path prefix a reverse proxy mounts the server under and strips (e.g. /flamingo): "
                          "its redirects then stay under it (the page's own URLs are relative)")
    srv.add_argument("--keep-alive", type=positive_float, default=5,
                     help="seconds an idle connection stays open, a new one has to send its first request head, "
                          "and a request body may stop arriving (408); behind a reverse proxy that reuses "
                          "connections, more than the proxy's idle timeout (nginx's keepalive_timeout: 60), so the "
                          "proxy closes first and never sends on a connection the server is closing (a 502)")
    srv.add_argument("--max-connections", type=positive_int, default=None,
                     help="connections open at once (idle keep-alive ones count); past it, a request on any of "
                          "them is answered 503 at once and its connection closed. "
                          "Bounds the memory of streams whose clients do not read (default: no limit)")
    srv.add_argument("--grace", type=non_negative_float, default=30,
                     help="seconds in-flight requests get to finish on SIGTERM (a finite number >= 0)")
    srv.add_argument("--batch-dir", default=None,
                     help="serve OpenAI's Files and Batch APIs (/v1/files, /v1/batches), keeping files and batches "
                          "in this directory; a batch left running runs again on restart (docs/serve.md)")
    srv.add_argument("--batch-concurrency", type=positive_int, default=None,
                     help="a batch's requests in flight, the rest of the queue left to interactive requests "
                          "(default: --max-batch)")
    srv.add_argument("--max-batch-file-mb", type=positive_float, default=200,
                     help="an uploaded batch file's size limit")
    srv.set_defaults(func=_cmd_serve)

    bat = sub.add_parser("batch", help="answer a JSONL file of OpenAI Batch API requests offline, through the "
                                       "server's endpoints (docs/serve.md)")
    _add_engine_options(bat)
    bat.add_argument("--input", required=True, help="requests, one per line: {custom_id, method, url, body}")
    bat.add_argument("--output", required=True, help="responses in input order, OpenAI's batch output format")
    bat.add_argument("--concurrency", type=positive_int, default=None,
                     help="requests in flight (default: twice --max-batch, within --max-queue)")
    bat.add_argument("--no-progress", action="store_true", help="no progress bar")
    bat.set_defaults(func=_cmd_batch, api_key=None, batch_dir=None, batch_concurrency=None, max_batch_file_mb=200,
                     allowed_hosts=[])

    # The demo sits beside the library (flamingo_demo/): `main` hands it the rest of the command line unparsed, so
    # its options and help are its own, and it is imported only when asked for.
    sub.add_parser("demo", add_help=False, help="grow a mini Flamingo offline (world, backbones, training, few-shot "
                                                "eval, report.md); `flamingo demo --help` for its options")

    train = sub.add_parser("train", help="train a Flamingo from a YAML config (an annotated one: "
                                         "configs/example.yaml of the source repository and its sdist)")
    train.add_argument("config")
    train.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.steps=100")
    train.set_defaults(func=_cmd_train)

    convert = sub.add_parser("convert", help="convert foreign checkpoints")
    convert_sub = convert.add_subparsers(dest="source", required=True)
    of = convert_sub.add_parser("open-flamingo", help="an OpenFlamingo checkpoint (2.x, or v1 and Med-Flamingo)")
    of.add_argument("--model", default=None, help="a published checkpoint, e.g. "
                    "openflamingo/OpenFlamingo-3B-vitl-mpt1b (its checkpoint.pt and backbones downloaded; "
                    "docs/convert.md lists them)")
    of.add_argument("--checkpoint", default=None, help="an OpenFlamingo checkpoint.pt (instead of --model)")
    of.add_argument("--vision", default=None, help="HF vision tower name/path (e.g. openai/clip-vit-large-patch14); "
                    "with --model, the published one unless given")
    of.add_argument("--lm", default=None, help="HF causal LM name/path; with --model, the published one unless given")
    of.add_argument("--tokenizer", default=None, help="defaults to the LM's")
    of.add_argument("--v1", action="store_true", help="an OpenFlamingo v1 checkpoint (open_flamingo 0.0.x): text "
                    "sees the next image, as v1 computes it (implied by --model for the v1 names)")
    of.add_argument("--out", required=True)
    of.add_argument("--trained-only", action="store_true", help="store trained weights + backbone references")
    of.set_defaults(func=_cmd_convert_open_flamingo)
    mmgpt = convert_sub.add_parser("mmgpt", help="a Multimodal-GPT checkpoint (OpenFlamingo-9B v1 + LoRA; "
                                   "docs/convert.md)")
    mmgpt.add_argument("--lm", required=True, help="the LLaMA-7B it was trained on: a directory or mirror in Hugging "
                       "Face format (LLaMA-7B has no canonical hub name)")
    mmgpt.add_argument("--finetune", default=None, help="its LoRA file or URL (default: the released "
                       "mmgpt-lora-v0-release.pt, downloaded once)")
    mmgpt.add_argument("--base", default=None, help="the OpenFlamingo v1 checkpoint.pt it sits on (default: "
                       "openflamingo/OpenFlamingo-9B-deprecated's, downloaded once)")
    mmgpt.add_argument("--vision", default=None, help="the vision tower (default: openai/clip-vit-large-patch14)")
    mmgpt.add_argument("--tokenizer", default=None, help="defaults to the LM's")
    mmgpt.add_argument("--merge-lora", action="store_true", help="fold the LM's adapters into its weights (the LM "
                       "is then saved whole) instead of keeping them as lm_lora adapters")
    mmgpt.add_argument("--out", required=True)
    mmgpt.add_argument("--trained-only", action="store_true", help="store trained weights + backbone references")
    mmgpt.set_defaults(func=_cmd_convert_mmgpt)
    idefics = convert_sub.add_parser("idefics", help="an IdeficsForVisionText2Text checkpoint (docs/convert.md)")
    idefics.add_argument("--model", required=True, help="hub name or directory (e.g. HuggingFaceM4/idefics-9b)")
    idefics.add_argument("--tokenizer", default=None, help="defaults to the model's")
    idefics.add_argument("--adapter", default=None, help="a PEFT LoRA adapter of the model (directory or hub name; "
                         "a fine-tune, as HF's IDEFICS notebooks save them), merged in; --model may also be such an "
                         "adapter, on the base its config names")
    otter = convert_sub.add_parser("otter", help="an Otter (or its HF-format OpenFlamingo) checkpoint "
                                   "(docs/convert.md)")
    otter.add_argument("--model", required=True, help="hub name or directory (e.g. luodian/OTTER-Image-MPT7B)")
    otter.add_argument("--tokenizer", default=None, help="defaults to the repository's, else the base LM's Otter "
                       "loads (mosaicml/mpt-7b-instruct for MPT)")
    for hub, what in ((of, "the published checkpoint's (its backbones are read at theirs)"),
                      (idefics, "--model's (an adapter's base is read at main)"), (otter, "--model's")):
        hub.add_argument("--revision", default=None, help=f"the Hub branch, tag or commit of {what}; default main")
    for converter in (of, mmgpt, idefics, otter):
        converter.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default=None,
                               help="the dtype to read and save in (default: the checkpoint's"
                                    + ("; OpenFlamingo's trained parts are float32)" if converter in (of, mmgpt)
                                       else ")"))
    for whole in (idefics, otter):
        whole.add_argument("--out", required=True)
        whole.add_argument("--backbones", default=None, help="write the vision tower and LM here (vision/, lm/)")
        whole.add_argument("--trained-only", action="store_true",
                           help="store trained weights + references to the --backbones directories")
        whole.set_defaults(func=_cmd_convert_whole)

    push = sub.add_parser("push", help="share a saved model on the Hugging Face Hub (docs/architecture.md)")
    push.add_argument("--model", required=True, help="a directory written by save_pretrained (with its processor)")
    push.add_argument("--repo", required=True, help="the model repository, org/name (created if missing)")
    push.add_argument("--private", action="store_true", help="create the repository private")
    push.add_argument("--revision", default=None, help="the branch to commit to (created if missing; default main)")
    push.add_argument("--message", default="Upload Flamingo", help="the commit message")
    push.add_argument("--replace-card", action="store_true",
                      help="replace the repository's README.md (kept by default when it has one)")
    push.add_argument("--results", nargs="+", default=[], metavar="DIR",
                      help="`flamingo eval --out` directories: their results tables go into the card")
    push.add_argument("--train-config", action="store_true",
                      help="also upload train_config.json, the training run's config (left out by default: it names "
                           "the run's data and output paths)")
    push.set_defaults(func=_cmd_push)

    export = sub.add_parser("export", help="write a model in a foreign format")
    export_sub = export.add_subparsers(dest="target", required=True)
    to_of = export_sub.add_parser("open-flamingo", help="an OpenFlamingo 2.x checkpoint.pt (docs/convert.md)")
    to_of.add_argument("--model", required=True, help=MODEL_HELP)
    to_of.add_argument("--out", required=True, help="the checkpoint file to write (and OUT.json: how to load it)")
    to_of.set_defaults(func=_cmd_export_open_flamingo)
    to_idefics = export_sub.add_parser("idefics", help="a transformers IdeficsForVisionText2Text directory "
                                       "(docs/convert.md)")
    to_idefics.add_argument("--model", required=True, help=MODEL_HELP)
    to_idefics.add_argument("--out", required=True, help="the directory to write (model, tokenizer, image processor)")
    for exporter in (to_of, to_idefics):
        exporter.add_argument("--revision", default=None, help=REVISION_HELP)
    to_idefics.set_defaults(func=_cmd_export_idefics)

    from .eval.cli import add_eval_subcommand

    add_eval_subcommand(sub)
    try:
        from .data.cli import add_data_subcommands
    except ImportError as e:  # the data package is optional at import time (it needs extra packages): said when used
        unavailable = sub.add_parser("data", help=f"(unavailable here: {e})")
        unavailable.add_argument("rest", nargs=argparse.REMAINDER)
        unavailable.set_defaults(func=partial(_data_unavailable, e))
    else:
        add_data_subcommands(sub)
    return parser


def _data_unavailable(error: ImportError, args: argparse.Namespace) -> int:
    raise ValueError(f"`flamingo data` cannot run here: its package did not import ({type(error).__name__}: {error})")


def _printable_stdout() -> None:
    """A stdout that cannot encode every character (a Windows redirect's cp1252, ASCII under LANG=C) writes the ones
    it lacks as "?": a generation or a results table is not lost, with an error blaming the input, to one character
    the terminal cannot show."""
    stream = sys.stdout
    if isinstance(stream, io.TextIOWrapper) and codecs.lookup(stream.encoding or "utf-8").name != "utf-8":
        stream.reconfigure(errors="replace")


# In every ImportError the library raises for a package of an extra (a video without PyAV, lm_lora without peft,
# optim.kind=adamw8bit without torchao, a SentencePiece tokenizer without sentencepiece): `main` says those in one
# line, as the ValueErrors of `needs_extra`; they stay ImportErrors so that data loaders do not skip them as bad files
EXTRA_HINT = "pip install 'flamingo-vlm["


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_cpp_notices_off_rank_0()  # before anything imports torch, which reads its C++ log level once
    quiet_irrelevant_warnings()  # before anything imports transformers (and with it torchao)
    if argv[:1] == ["demo"]:
        from flamingo_demo.cli import main as demo_main  # the one import of the demo: lazily, for this command

        return demo_main(argv[1:])
    args = build_parser().parse_args(argv)
    _printable_stdout()
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as e:  # bad input (a path, a file's content, a server to reach): said in one line
        print(f"flamingo: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        if EXTRA_HINT not in str(e):  # not ours: a broken install, whose traceback says where
            raise
        print(f"flamingo: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
