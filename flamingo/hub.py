"""Sharing a Flamingo on the Hugging Face Hub: `push_to_hub` uploads what `save_pretrained` writes to a model
repository in one commit, its card (`README.md`) named after the repository; `load_pretrained("org/name")` and
`flamingo serve --model org/name` read it back (runtime/hub.py)."""

from __future__ import annotations

import importlib
import logging
import os
import tempfile
from typing import Any, Optional, Sequence, Union

from .config import CONFIG_NAME, WEIGHTS_NAME, FlamingoConfig
from .model.card import CARD_NAME, generated_for, model_card
from .model.flamingo import Flamingo
from .processing import PROCESSOR_CONFIG_NAME, has_saved_processor
from .runtime.hub import is_hub_name

# remote paths the saved format owns: a push removes those its upload lacks (a trained-only push over a full one
# must not leave stale `vision/` and `lm/` that loading would prefer over the backbones' names; a push saved without
# a processor must not leave the previous model's tokenizer, which `load_pretrained` would pair with the new model:
# the repository then has no processor, and loading it says so)
_OWNED_DIRS = ("vision/", "lm/")
PROCESSOR_FILES = (PROCESSOR_CONFIG_NAME, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
                   "processor_config.json", "video_preprocessor_config.json")
_OWNED_FILES = (WEIGHTS_NAME, CONFIG_NAME, *PROCESSOR_FILES)
log = logging.getLogger(__name__)
RESULTS_TABLE = "results.md"  # what `flamingo eval --out DIR` writes beside results.json (eval/runner.py)
RESULTS_FILE = "results.json"
# `flamingo eval` task -> the Hub's task type, for the card's `model-index` (the Hub's evaluation results)
HUB_TASK_TYPES = {"vqa": "visual-question-answering", "videoqa": "visual-question-answering",
                  "videoqa_mc": "visual-question-answering", "visdial": "visual-question-answering",
                  "mme": "visual-question-answering", "multi_image": "visual-question-answering",
                  "multi_image_plain": "visual-question-answering", "captioning": "image-to-text",
                  "video_captioning": "video-text-to-text", "classification": "image-classification",
                  "hateful_memes": "image-classification"}


def _local_files(directory: str) -> dict[str, str]:
    """Every file under `directory` by its repository path (`/` separated), dot-files left out."""
    files = {}
    for root, dirs, names in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if not name.startswith("."):
                path = os.path.join(root, name)
                files[os.path.relpath(path, directory).replace(os.sep, "/")] = path
    return files


def push_directory(directory: str, repo_id: str, *, private: Optional[bool] = None, revision: Optional[str] = None,
                   commit_message: str = "Upload Flamingo", token: Optional[str] = None,
                   replace_card: bool = False, results: Sequence[str] = ()) -> str:
    """Upload a directory written by `save_pretrained` to the model repository `repo_id` (created if missing; on
    branch `revision`, created if missing) in one commit; returns the commit's URL. The card save_pretrained wrote is
    written again for `repo_id`, whatever name it was written for (the directory may be renamed or copied since;
    `card.generated_for`); one edited by hand goes as it is; a card already in the repository is kept unless
    `replace_card`. `results`: directories `flamingo eval` wrote (`--out`), whose tables (`results.md`) the card
    gains under "Evaluation", and their means its `model-index` metadata (the Hub's evaluation results; the card is
    then written even over one on the Hub). Files of the format that the
    repository holds and the directory lacks are removed in the same commit (the backbones' `vision/` and `lm/`, and
    the processor's files: a directory saved without a processor leaves the repository without one, never with the
    previous model's tokenizer); other files are left alone."""
    if not is_hub_name(repo_id):
        raise ValueError(f"{repo_id!r} is not a Hub repository name (org/name)")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not os.path.isfile(os.path.join(directory, name)):
            raise ValueError(f"{directory!r} holds no {name}: not a directory written by save_pretrained")
    config = FlamingoConfig.load(directory)
    for part, ref in (("vision", config.vision_name_or_path), ("lm", config.lm_name_or_path)):
        # a local path nobody else has, even one that reads as `org/name` (a relative path, resolved here)
        if not os.path.isdir(os.path.join(directory, part)) and (not is_hub_name(str(ref)) or os.path.exists(str(ref))):
            raise ValueError(f"{directory!r} is a trained-only checkpoint whose {part} backbone is the local path "
                             f"{ref!r}, which nobody else can load: push a full checkpoint (save_pretrained without "
                             "trained_only), or build the model from the backbones' Hub names")
    if not has_saved_processor(directory):
        log.warning("%r holds no processor (saved without processor=): the repository will hold none, and "
                    "load_pretrained(%r) will refuse it", directory, repo_id)
    tables = [_results_table(d) for d in results]
    evals = [e for d in results for e in eval_results(d)]
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    try:
        return _commit(directory, repo_id, private=private, revision=revision, commit_message=commit_message,
                       token=token, replace_card=replace_card or bool(tables), tables=tables, evals=evals)
    except (HfHubHTTPError, LocalTokenNotFoundError) as e:
        raise ValueError(f"the Hub refused the push to {repo_id!r} ({type(e).__name__}: {str(e).splitlines()[0]}): "
                         "log in with a write token (`hf auth login`, or HF_TOKEN), and check the repository's "
                         "name and your rights to it") from e
    except _network_errors() as e:
        raise ValueError(f"the push to {repo_id!r} could not reach the Hub ({type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0]}): check the network, HF_ENDPOINT, and that "
                         "HF_HUB_OFFLINE is not set") from e


def _network_errors() -> tuple[type[BaseException], ...]:
    """What a Hub call raises when the Hub cannot be reached: OSError (huggingface_hub's offline mode, requests'
    errors) and the transport errors of the HTTP client huggingface_hub uses (httpx or httpx2, by its version)."""
    errors: list[type[BaseException]] = [OSError]
    for name in ("httpx", "httpx2"):
        try:
            errors.append(importlib.import_module(name).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def eval_results(out_dir: str) -> list[Any]:
    """The card metadata (`huggingface_hub.EvalResult`s) of a directory `flamingo eval --out` wrote: each metric's
    mean over trials, per number of shots (breakdowns such as `vqa_accuracy/yes/no` stay in the table)."""
    import json

    from huggingface_hub import EvalResult

    path = os.path.join(out_dir, RESULTS_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{out_dir!r} holds no {RESULTS_FILE}: not a directory `flamingo eval --out` wrote")
    with open(path, encoding="utf-8") as f:
        results = json.load(f)
    task, data = results["task"], os.path.basename(str(results.get("data", "")).rstrip("/")) or results["task"]
    return [EvalResult(task_type=HUB_TASK_TYPES.get(task, "image-text-to-text"), task_name=f"{task}, {row['shots']}"
                       f"-shot", dataset_type=task, dataset_name=data, metric_type=row["metric"],
                       metric_name=f"{row['metric']} ({row['shots']}-shot)", metric_value=round(row["mean"], 2))
            for row in results["summary"] if row["mean"] is not None and "/" not in row["metric"]]


def _results_table(out_dir: str) -> str:
    """The table `flamingo eval --out out_dir` wrote, its title a third-level heading."""
    path = os.path.join(out_dir, RESULTS_TABLE)
    if not os.path.isfile(path):
        raise ValueError(f"{out_dir!r} holds no {RESULTS_TABLE}: not a directory `flamingo eval --out` wrote")
    with open(path, encoding="utf-8") as f:
        text = f.read().strip()
    return "###" + text[1:] if text.startswith("# ") else text


def _commit(directory: str, repo_id: str, *, private: Optional[bool], revision: Optional[str], commit_message: str,
            token: Optional[str], replace_card: bool, tables: Sequence[str], evals: Sequence[Any] = ()) -> str:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, ModelCard

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    local = _local_files(directory)
    card = local.pop(CARD_NAME, None)
    text = None
    if card is not None:
        with open(card, encoding="utf-8") as f:
            text = f.read()
    if text is None or generated_for(directory, text) is not None:
        text = model_card(directory, repo_id)  # the card save_pretrained wrote (any name), named for the repository
    if tables:
        intro = "Few-shot results measured with `flamingo eval` (mean ± std over trials, in percent):"
        text = text.rstrip("\n") + f"\n\n## Evaluation\n\n{intro}\n\n" + "\n\n".join(tables) + "\n"
    if evals:  # the same means as the Hub's evaluation results (`model-index`)
        card = ModelCard(text)
        card.data.model_name = card.data.model_name or repo_id.split("/")[-1]
        card.data.eval_results = list(evals)
        text = str(card)
    remote = set(api.list_repo_files(repo_id, revision=revision))
    operations: list[Any] = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=file)
                             for path, file in local.items()]
    if replace_card or CARD_NAME not in remote:
        operations.append(CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=text.encode()))
    operations += [CommitOperationDelete(path_in_repo=path) for path in sorted(remote - set(local))
                   if path.startswith(_OWNED_DIRS) or path in _OWNED_FILES]
    info = api.create_commit(repo_id, operations, commit_message=commit_message, revision=revision)
    return str(info.commit_url)


def push_to_hub(model: Union[Flamingo, str], repo_id: str, *, processor: Any = None, trained_only: bool = False,
                **kwargs: Any) -> str:
    """Share a model on the Hub: a `Flamingo` (saved first, as `save_pretrained(..., trained_only=, processor=)`
    writes it; pass the processor so that `load_pretrained(repo_id)` finds it) or a saved directory. kwargs:
    `push_directory`'s (private, revision, commit_message, token, replace_card, results). Returns the commit's URL."""
    if isinstance(model, Flamingo):
        with tempfile.TemporaryDirectory() as tmp:
            directory = os.path.join(tmp, repo_id.rsplit("/", 1)[-1])
            model.save_pretrained(directory, trained_only=trained_only, processor=processor)
            return push_directory(directory, repo_id, **kwargs)
    if processor is not None or trained_only:
        raise ValueError("processor and trained_only apply to a model object; a directory is pushed as saved")
    return push_directory(str(model), repo_id, **kwargs)
