"""`flamingo eval`: the few-shot evaluation subcommand (wired into flamingo/cli.py by `add_eval_subcommand`)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..config import QUANTIZE_MODES
from ..runtime.arguments import finite_float, non_negative_float
from ..runtime.dtypes import DTYPE_NAMES, torch_dtype
from ..runtime.quiet import quiet_transformers
from .captioning import CAPTION_DEMOS
from .cider import TOKENIZERS
from .demos import METHODS, ZERO_SHOT
from .extras import check_requirements
from .task import RANK_BY
from .tasks import TASKS, check_task_options
from .vqa import DEMO_ANSWERS


def _optional_int(value: str) -> Any:
    return None if value.lower() in ("all", "none") else int(value)


def _escaped(value: str) -> str:
    """A command-line string with Python's backslash escapes read (`"\\n"` -> a line break); other text as given."""
    try:  # backslashreplace: characters beyond Latin-1 pass through unicode_escape unchanged
        return value.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError as e:
        raise argparse.ArgumentTypeError(f"{value!r} holds a broken backslash escape ({e.reason})") from None


def _query_set(value: str) -> Any:
    """--query-set: a number >= 1, or "all" (the whole train split)."""
    if value.lower() == "all":
        return "all"
    if not value.strip().isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1 or 'all', got {value!r}")
    return int(value)


class _StoreSpelling(argparse.Action):
    """Stores the value and, as `<dest>_flag`, the flag it came with: a refusal names the spelling the user wrote."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Any = None) -> None:
        setattr(namespace, self.dest, values)
        setattr(namespace, f"{self.dest}_flag", option_string)


def add_eval_subcommand(subparsers: Any) -> argparse.ArgumentParser:
    """Add `eval` to a `parser.add_subparsers()` object; returns its parser."""
    p = subparsers.add_parser("eval", help="few-shot evaluation on VQA, captioning, classification, HatefulMemes, "
                                           "VisDial, MME, multi-image questions, video QA (open or multiple "
                                           "choice) or video captioning (see docs/eval.md)")
    p.add_argument("--model", required=True, help="a directory written by save_pretrained (with its processor), or a "
                                                  "Hub repository holding one (org/name); or an IDEFICS, Otter or "
                                                  "published OpenFlamingo checkpoint, converted in memory on load")
    p.add_argument("--revision", default=None,
                   help="with a Hub repository as --model: the branch, tag or commit to load (default: main)")
    p.add_argument("--task", required=True, choices=list(TASKS))
    p.add_argument("--data", required=True, help="the task's data directory (layouts: docs/eval.md), or a folder of a "
                   "Hub dataset, hf://datasets/ORG/NAME[@REVISION][/FOLDER] (downloaded once)")
    p.add_argument("--shots", type=int, nargs="+", default=[0, 4, 8, 32],
                   help="numbers of demos, each run once per trial (sorted, duplicates dropped)")
    p.add_argument("--trials", type=int, default=3, help="seeds seed..seed+trials-1: mean ± std")
    p.add_argument("--demos", choices=METHODS, default="random", help="random demos or RICES (visual similarity)")
    p.add_argument("--query-set", type=_query_set, default=None,
                   help="train samples demos come from, drawn per seed ('all': the whole split; default: 2048 for "
                        "random demos, the whole split for RICES, as OpenFlamingo)")
    p.add_argument("--num-samples", type=_optional_int, default=None, help="evaluated test samples (default all)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate / score_batch call")
    p.add_argument("--vision-cache-mib", type=non_negative_float, default=None, action=_StoreSpelling,
                   help="keep the frozen tower's features of demo frames (encoded once per evaluation); 0 = off; "
                        "default 256 on CPU, off on GPU (hashing the pixels costs about as much as the tower there)")
    # another spelling, which scripts may use (MiB too); hidden, and out of abbreviation matching (flamingo/cli.py)
    p.add_argument("--vision-cache-mb", dest="vision_cache_mib", type=non_negative_float, default=argparse.SUPPRESS,
                   action=_StoreSpelling, help=argparse.SUPPRESS)
    p.add_argument("--zero-shot", choices=ZERO_SHOT, default="text",
                   help="0-shot prompts: 2 text-only demos (Flamingo/OpenFlamingo) or none")
    p.add_argument("--template", default=None, help="override the task's prompt template (keep {answer})")
    p.add_argument("--chat", action="store_true",
                   help="write each demo and the query as chat turns in the model's format (Otter's, IDEFICS's: "
                        "its processor's template), for instruction-tuned models; the template's query text is "
                        "the user's turn")
    p.add_argument("--demo-separator", type=_escaped, default=None,
                   help='text after each demo, escapes read ("\\n", "" for none; default: the task\'s, "\\n" for vqa, '
                        'captioning and video_captioning as OpenFlamingo, else "")')
    p.add_argument("--answer-prefix", default=None,
                   help='text between the query and the answer (default: the task\'s, "" or " ")')
    p.add_argument("--rank-by", choices=RANK_BY, default=None,
                   help="ranked tasks: a candidate's score is its continuation's summed log-likelihood (sum, the "
                        "default) or the mean over the candidate's own tokens (mean: OpenFlamingo's ImageNet and "
                        "HatefulMemes ranking, docs/eval.md)")
    p.add_argument("--demo-answer", choices=DEMO_ANSWERS, default=None,
                   help="vqa: the answer a demo shows, its annotation's consensus multiple_choice_answer "
                        "(consensus, the default) or its first human answer (first: OpenFlamingo's prompts)")
    p.add_argument("--caption-demos", choices=list(CAPTION_DEMOS), default=None,
                   help="captioning: the Karpathy splits demos come from, every training image (train+restval, the "
                        "default; COCO's 113k) or train alone (train: OpenFlamingo's demo pool, COCO's 83k)")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--num-beams", type=int, default=None)
    p.add_argument("--length-penalty", type=finite_float, default=None,
                   help="beam search's length penalty (default 0.0, OpenFlamingo's: beams ranked by summed "
                        "log-probability; 1.0 divides it by the length, transformers' default)")
    p.add_argument("--cider-tokenizer", choices=TOKENIZERS, default="auto",
                   help="PTB (needs java) or the documented Python tokenization")
    p.add_argument("--out", default="eval_results",
                   help="output directory (results.json, results.md, results.png, predictions/) of one task: a re-run "
                        "of the task replaces its results there, another task's results there are refused")
    p.add_argument("--seed", type=int, default=0, help="first trial's seed (>= 0): demos and --num-samples subset")
    p.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default=None,
                   help="the model's dtype (default: the one it was saved in; a converted model's)")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when CUDA exists, else cpu")
    p.add_argument("--quantize-frozen", choices=QUANTIZE_MODES, default=None,
                   help="frozen backbones' linear weights quantized (docs/memory.md); default: the saved config's")
    p.add_argument("--server", default=None,
                   help="predict through a running `flamingo serve` at this URL (e.g. http://127.0.0.1:8000): "
                        "--model then gives only the processor (of any model --model takes: its configs and "
                        "tokenizer files are read, never its weights); random demos, greedy decoding (--num-beams 1); "
                        "--dtype, --device, --quantize-frozen and --vision-cache-mib are the server's (refused here)")
    p.add_argument("--api-key", default=None, help="the server's API key, if it asks for one")
    p.add_argument("--concurrency", type=int, default=8, help="requests to the server in flight at once")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_eval)
    return p


def _check_server_flags(args: argparse.Namespace) -> None:
    """With --server the server holds the model: the flags that shape an in-process one would be ignored, so they are
    refused (as --demos rices is), naming each one as given. A vision cache of 0 is what --server runs (no tower
    here)."""
    cache_flag = getattr(args, "vision_cache_mib_flag", None) or "--vision-cache-mib"  # the spelling typed
    given = [flag for flag, value in (("--dtype", args.dtype), ("--quantize-frozen", args.quantize_frozen),
                                      ("--device", args.device), (cache_flag, args.vision_cache_mib or None))
             if value is not None]
    if given:
        raise ValueError(f"{', '.join(given)} shape{'s' if len(given) == 1 else ''} an in-process model: with "
                         "--server the server holds the model (give them to `flamingo serve`), so drop them here")


def run_eval(args: argparse.Namespace) -> int:
    """Load `--model`, evaluate, print the table and a JSON summary line (rank 0)."""
    check_requirements(TASKS[args.task])  # the task's packages, before the model loads (as `evaluate` checks them)
    import torch.distributed as dist  # the model's stack: imported when the command runs, not for its --help

    from ..convert.auto import load_model, load_processor
    from ..runtime.device import check_device
    from ..runtime.distributed import default_device, init_process_group_from_env
    from .distributed import rank
    from .remote import RemoteModel, ServerError
    from .runner import evaluate, markdown_table

    # before the model loads
    check_task_options(args.task, args.rank_by, args.demo_answer, args.caption_demos, flags=True)
    if args.server:
        _check_server_flags(args)
    if args.device is not None:
        check_device(args.device)  # before the process group and the model
    joined = init_process_group_from_env()
    try:
        quiet_transformers(args.no_progress)
        dtype = torch_dtype(args.dtype) if args.dtype else None
        try:  # a server that cannot be reached, or answers an error (a wrong key): said in one line
            if args.server:  # the server holds the model; the harness needs only its processor
                processor = load_processor(args.model, revision=args.revision)
                model: Any = RemoteModel(args.server, api_key=args.api_key, concurrency=args.concurrency)
                model.positions()  # asked now: an unreachable server or a wrong key is said before the data load
            else:
                model, processor = load_model(args.model, torch_dtype=dtype, device=default_device(args.device),
                                              quantize_frozen=args.quantize_frozen, revision=args.revision)
            generation = {k: v for k, v in (("max_new_tokens", args.max_new_tokens), ("num_beams", args.num_beams),
                                            ("length_penalty", args.length_penalty)) if v is not None}
            results = evaluate(model, processor, args.task, args.data, shots=args.shots, trials=args.trials,
                               demos=args.demos, query_set=args.query_set, num_samples=args.num_samples,
                               batch_size=args.batch_size, out_dir=args.out, seed=args.seed, zero_shot=args.zero_shot,
                               template=args.template, answer_prefix=args.answer_prefix, model_name=args.model,
                               progress=not args.no_progress, generation=generation or None,
                               cider_tokenizer=args.cider_tokenizer, vision_cache_mb=args.vision_cache_mib,
                               chat=args.chat, demo_separator=args.demo_separator, rank_by=args.rank_by,
                               demo_answer=args.demo_answer, caption_demos=args.caption_demos)
        except ServerError as e:
            raise ValueError(str(e)) from None
        if rank() == 0:
            print(markdown_table(results))
            print(json.dumps({"task": results["task"], "out": args.out,
                              "summary": {f"{r['metric']}@{r['shots']}": r["mean"] for r in results["summary"]}}))
        return 0
    finally:
        if joined:
            dist.destroy_process_group()
