"""Sharing a Flamingo on the Hugging Face Hub: `push_to_hub` uploads what `save_pretrained` writes to a model
repository in one commit, its card (`README.md`) named after the repository; `load_pretrained("org/name")` and
`flamingo serve --model org/name` read it back (runtime/hub.py)."""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import os
import tempfile
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from .config import BACKBONE_DIRS, CONFIG_NAME, PROCESSOR_FILES, TRAIN_CONFIG_NAME, WEIGHTS_NAME, FlamingoConfig
from .model.card import CARD_NAME, generated_for, model_card, published_config
from .model.flamingo import Flamingo
from .processing import has_saved_processor
from .runtime.hub import HF_DATASET, is_hub_name

# remote paths the saved format owns: a push removes those its upload lacks (a trained-only push over a full one
# must not leave stale `vision/` and `lm/` that loading would prefer over the backbones' names; a push saved without
# a processor must not leave the previous model's tokenizer, which `load_pretrained` would pair with the new model:
# the repository then has no processor, and loading it says so; another model's push must not leave the previous
# run's `train_config.json` beside weights it did not make)
_OWNED_DIRS = ("vision/", "lm/")
# the run's TRAIN_CONFIG_NAME holds its data, image and output paths, the trainer's machine's: a push leaves it out
# unless asked (`train_config=True`)
_OWNED_FILES = (WEIGHTS_NAME, CONFIG_NAME, TRAIN_CONFIG_NAME, *PROCESSOR_FILES)
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


def check_repo_id(repo_id: str) -> None:
    """Refuse a repository name the Hub would refuse, before anything is saved or sent: not `org/name`
    (`is_hub_name`: `org/..`, `a/b/c`, spaces), or against huggingface_hub's own rules (`--`, a trailing `-` or `.`,
    `.git`)."""
    if not isinstance(repo_id, str) or not is_hub_name(repo_id):
        raise ValueError(f"{repo_id!r} is not a Hub repository name (org/name)")
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except ValueError as e:  # HFValidationError
        raise ValueError(f"{repo_id!r} is not a Hub repository name: {e}") from e


def _local_files(directory: str) -> dict[str, str]:
    """Every file under `directory` by its repository path (`/` separated), dot-files and dot-folders left out. A
    symlinked file or folder is uploaded as what it points to, as loading reads it (a `lm/` shared between
    checkpoints by a link); a link to a folder that holds it (a cycle) or to nothing is refused, naming it."""
    files: dict[str, str] = {}

    def visit(folder: str, prefix: str, ancestors: frozenset[str]) -> None:
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            if entry.is_dir():  # follows a link
                real = os.path.realpath(entry.path)
                if real in ancestors:
                    raise ValueError(f"{entry.path!r} links to a folder that holds it: a push cannot upload a cycle")
                visit(entry.path, f"{prefix}{entry.name}/", ancestors | {real})
            elif entry.is_file():  # follows a link
                files[prefix + entry.name] = entry.path
            else:
                raise ValueError(f"{entry.path!r} is neither a file nor a folder (a broken link?): a push uploads "
                                 "every file of the directory; fix or remove it")

    visit(directory, "", frozenset({os.path.realpath(directory)}))
    return files


def push_directory(directory: str, repo_id: str, *, private: Optional[bool] = None, revision: Optional[str] = None,
                   commit_message: str = "Upload Flamingo", token: Optional[str] = None,
                   replace_card: bool = False, results: Sequence[str] = (), train_config: bool = False) -> str:
    """Upload a directory written by `save_pretrained` to the model repository `repo_id` (created if missing; on
    branch `revision`, created if missing) in one commit; returns the commit's URL. The card save_pretrained wrote is
    written again for `repo_id`, whatever name it was written for (the directory may be renamed or copied since;
    `card.generated_for`); one edited by hand goes as it is; a card already in the repository is kept unless
    `replace_card`. `results`: directories `flamingo eval` wrote (`--out`), whose tables (`results.md`) the card
    gains under "Evaluation", each headed by its task and dataset, and their means its `model-index` metadata (the
    Hub's evaluation results, `_results`; the card is then written even over one on the Hub).
    Nothing names a path of this machine: a full checkpoint's backbones built from local directories are published
    as stored in `vision/` and `lm/` (`card.published_config`: their paths are cleared from the uploaded
    `flamingo_config.json` and the card), and `train_config.json` (a trained model's run config, with its data and
    output paths) is uploaded only with `train_config=True`. Files of the format that the
    repository holds and the directory lacks are removed in the same commit (the backbones' `vision/` and `lm/`, the
    processor's files: a directory saved without a processor leaves the repository without one, never with the
    previous model's tokenizer; an earlier `train_config.json`); other files are left alone. Everything is checked
    before the first request to the Hub."""
    check_repo_id(repo_id)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not os.path.isfile(os.path.join(directory, name)):
            raise ValueError(f"{directory!r} holds no {name}: not a directory written by save_pretrained")
    config = FlamingoConfig.load(directory)
    for part, ref in (("vision", config.vision_name_or_path), ("lm", config.lm_name_or_path)):
        # a local path nobody else has, even one that reads as `org/name` (a relative path, resolved here)
        if not os.path.isdir(os.path.join(directory, part)) and (not is_hub_name(str(ref)) or os.path.exists(str(ref))):
            raise ValueError(f"{directory!r} is a trained-only checkpoint whose {part} backbone is the local path "
                             f"{ref!r}, which nobody else can load: push a full checkpoint ("
                             f"{_whole_save(directory, config)}), or build the model from the backbones' Hub names")
    if not has_saved_processor(directory):
        log.warning("%r holds no processor (saved without processor=): the repository will hold none, and "
                    "load_pretrained(%r) will refuse it", directory, repo_id)
    local = _local_files(directory)
    for part in BACKBONE_DIRS:  # what loading reads must be what is uploaded
        if os.path.isdir(os.path.join(directory, part)) and f"{part}/config.json" not in local:
            raise ValueError(f"{os.path.join(directory, part)!r} holds no config.json: not a backbone "
                             "save_pretrained wrote, and the repository could not load it")
    if TRAIN_CONFIG_NAME in local and not train_config:
        del local[TRAIN_CONFIG_NAME]
        log.info("%s (the training run's config, with its local paths) is not uploaded: `flamingo push "
                 "--train-config` (train_config=True) publishes it", TRAIN_CONFIG_NAME)
    published = published_config(directory, config)
    files: dict[str, Union[str, bytes]] = dict(local)
    if published is not config:  # its local backbone paths cleared
        files[CONFIG_NAME] = json.dumps(published.to_dict(), indent=2, sort_keys=True, allow_nan=False).encode()
    tables, evals = _results(results)
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    try:
        return _commit(directory, files, repo_id, private=private, revision=revision, commit_message=commit_message,
                       token=token, replace_card=replace_card or bool(tables), tables=tables, evals=evals)
    except (HfHubHTTPError, LocalTokenNotFoundError) as e:
        raise ValueError(f"the Hub refused the push to {repo_id!r} ({type(e).__name__}: {str(e).splitlines()[0]}): "
                         "log in with a write token (`hf auth login`, or HF_TOKEN), and check the repository's "
                         "name and your rights to it") from e
    except _network_errors() as e:
        raise ValueError(f"the push to {repo_id!r} could not reach the Hub ({type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0]}): check the network, HF_ENDPOINT, and that "
                         "HF_HUB_OFFLINE is not set") from e


def _whole_save(directory: str, config: FlamingoConfig) -> str:
    """How to save the trained-only checkpoint in `directory` whole. Quantized backbones (`quantize_frozen`) are never
    saved whole, and the rerun of a run with `train.save_trained_only=false` is refused without a whole model to copy
    float backbones from; but loaded unquantized, the checkpoint reads the float backbones it names, and its mode set
    back in the config quantizes them again when the whole save loads. Otherwise a `flamingo train` result (its
    final/ holds the run's config) is rewritten whole by the CLI."""
    if config.quantize_frozen != "none":
        mode = config.quantize_frozen
        load = (f"from flamingo import load_pretrained; model, processor = load_pretrained({directory!r}, "
                f"quantize_frozen=\"none\"); model.config.quantize_frozen = \"{mode}\"; "
                "model.save_pretrained(DIR, processor=processor)" if has_saved_processor(directory) else
                f"from flamingo import Flamingo; model = Flamingo.from_pretrained({directory!r}, "
                f"quantize_frozen=\"none\"); model.config.quantize_frozen = \"{mode}\"; model.save_pretrained(DIR)")
        return (f"its backbones are quantized ({mode}), and quantized backbones are never saved whole: save it whole "
                f"from the float backbones it names, `{load}`, and push DIR, which loads quantized again as this "
                "checkpoint does")
    trained = os.path.isfile(os.path.join(directory, TRAIN_CONFIG_NAME))
    return (("`flamingo train` wrote this one: run `flamingo train CONFIG train.save_trained_only=false` with its "
             "config again, which resumes at its last step and rewrites final/ whole without training; from Python: "
             if trained else "") + "save_pretrained without trained_only")


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


def _read_results(out_dir: str) -> dict[str, Any]:
    """The results.json of a directory `flamingo eval --out` wrote, which must hold its results.md too."""
    for name in (RESULTS_FILE, RESULTS_TABLE):
        if not os.path.isfile(os.path.join(out_dir, name)):
            raise ValueError(f"{out_dir!r} holds no {name}: not a directory `flamingo eval --out` wrote")
    with open(os.path.join(out_dir, RESULTS_FILE), encoding="utf-8") as f:
        results: dict[str, Any] = json.load(f)
    if results.get("unfinished"):  # the runs of an evaluation that stopped: not what its settings promise
        todo = ", ".join(f"{r['shots']}-shot trial {r['trial']}" for r in results["unfinished"])
        raise ValueError(f"{out_dir!r} holds an evaluation that did not finish ({todo} not run): run it to the end "
                         "(the same `flamingo eval` command) before pushing its results")
    return results


def _dataset_names(datas: Iterable[str]) -> dict[str, str]:
    """The name each local dataset directory of one push (`flamingo eval --data`, by its normalized path) is filed
    under: its folder's name (`/data/okvqa` -> `okvqa`: the path is the evaluator's); where two paths end in the same
    folder (`/a/okvqa/val2014`, `/a/vqav2/val2014`: both COCO's val2014 images), its parent's and its own
    (`okvqa/val2014`). Paths that even so share a name are refused: the card would file two datasets as one, or
    publish more of this machine's paths (a user's home folder) to tell them apart."""
    paths = sorted({os.path.normpath(d) for d in datas if d and not HF_DATASET.match(d)})
    parts = {path: path.split(os.sep) for path in paths}  # an absolute path's first part is "" (the root)
    names: dict[str, str] = {}
    for path in paths:
        shared = any(parts[other][-1] == parts[path][-1] for other in paths if other != path)
        names[path] = "/".join(p for p in parts[path][-2 if shared else -1:] if p)
    for path in paths:
        same = [other for other in paths if other != path and names[other] == names[path]]
        if same:
            raise ValueError(f"the results' datasets {path!r} and {same[0]!r} would both be named {names[path]!r} on "
                             "the card (a dataset is named by its folder, and its parent's where two folders share a "
                             "name): rename a folder, or push their results separately")
    return names


def _dataset(results: dict[str, Any], names: Mapping[str, str]) -> dict[str, Optional[str]]:
    """The dataset `flamingo eval` results were measured on, as `huggingface_hub.EvalResult` fields: a Hub dataset
    (`hf://datasets/ORG/NAME[@REVISION][/PATH]`) by its id, revision and folder; a local directory by its name among
    the push's (`names`, `_dataset_names`); none recorded: the task's name."""
    data = str(results.get("data") or "")
    m = HF_DATASET.match(data)
    if m:
        repo, folder = m.group(1), (m.group(3) or "").strip("/") or None
        return {"dataset_type": repo, "dataset_name": f"{repo}/{folder}" if folder else repo,
                "dataset_config": folder, "dataset_revision": m.group(2)}
    name = names[os.path.normpath(data)] if data else ""
    name = name if name not in ("", ".", "..") else str(results["task"])
    return {"dataset_type": name, "dataset_name": name, "dataset_config": None, "dataset_revision": None}


def eval_results(out_dir: str) -> list[Any]:
    """The card metadata (`huggingface_hub.EvalResult`s) of one directory `flamingo eval --out` wrote, as a push of
    it alone files them (`_results`)."""
    return _results([out_dir])[1]


def _results_table(out_dir: str, task: str, dataset: str) -> str:
    """The table `flamingo eval --out out_dir` wrote, headed (third level) by its task and dataset: results.md's own
    title names the evaluated model by its local path."""
    with open(os.path.join(out_dir, RESULTS_TABLE), encoding="utf-8") as f:
        text = f.read().strip()
    if text.startswith("# "):
        text = text.partition("\n")[2].lstrip("\n")
    return f"### {task} on {dataset}\n\n{text}"


def _results(out_dirs: Sequence[str]) -> tuple[list[str], list[Any]]:
    """The card's tables and model-index metadata (`huggingface_hub.EvalResult`s) of `flamingo eval --out`
    directories: each metric's mean over trials, per number of shots (breakdowns such as `vqa_accuracy/yes/no` stay
    in the table), named with its shots (`vqa_accuracy (4-shot)`). The Hub's model-index holds one entry per task
    type and dataset (`_dataset`): a 0/4-shot run and a later 32-shot one of a task are three metrics of it. Where two
    tasks of one type share a dataset (`multi_image` and its `multi_image_plain` baseline), the entry is named by
    both and each metric by its task too (`accuracy (multi_image_plain, 4-shot)`), so that neither's values read as
    the other's. One metric of a task there twice (the same shots measured in two directories) is refused: the
    model-index would hold two values of one name."""
    from huggingface_hub import EvalResult

    runs = []  # (out_dir, task, dataset, its model-index entry, the rows the model-index holds)
    entries: dict[tuple[Optional[str], ...], list[str]] = {}  # model-index entry -> the tasks filed under it
    read = [(out_dir, _read_results(out_dir)) for out_dir in out_dirs]
    names = _dataset_names(str(results.get("data") or "") for _, results in read)
    for out_dir, results in read:
        task, dataset = str(results["task"]), _dataset(results, names)
        entry = (HUB_TASK_TYPES.get(task, "image-text-to-text"), dataset["dataset_type"], dataset["dataset_config"],
                 dataset["dataset_revision"])
        rows = [row for row in results["summary"] if row["mean"] is not None and "/" not in row["metric"]]
        tasks = entries.setdefault(entry, [])  # (an entry without scores too: all its queries skipped, say)
        if rows and task not in tasks:
            tasks.append(task)
        runs.append((out_dir, task, dataset, entry, rows))
    tables, evals, seen = [], [], {}
    for out_dir, task, dataset, entry, rows in runs:
        shared = len(entries[entry]) > 1
        found = [EvalResult(task_type=entry[0], task_name=", ".join(entries[entry]), **dataset, dataset_split="test",
                            metric_type=row["metric"], metric_value=round(row["mean"], 2),
                            metric_name=f"{row['metric']} ({f'{task}, ' if shared else ''}{row['shots']}-shot)")
                 for row in rows]
        for key, e in {(*e.unique_identifier, task, e.metric_name): e for e in found}.items():
            if key in seen:
                raise ValueError(f"{seen[key]!r} and {out_dir!r} both hold {e.metric_name} of {e.task_type} on the "
                                 f"dataset {e.dataset_name!r}: the card's model-index holds one value of each metric, "
                                 "so push one of them")
            seen[key] = out_dir
        tables.append(_results_table(out_dir, task, str(dataset["dataset_name"])))
        evals += found
    return tables, evals


def _commit(directory: str, files: dict[str, Union[str, bytes]], repo_id: str, *, private: Optional[bool],
            revision: Optional[str], commit_message: str, token: Optional[str], replace_card: bool,
            tables: Sequence[str], evals: Sequence[Any] = ()) -> str:
    """Commit `files` (repository path -> local path or content) of the saved model in `directory` and its card."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, ModelCard

    local = dict(files)
    card = local.pop(CARD_NAME, None)
    text = None
    if isinstance(card, str):
        with open(card, encoding="utf-8") as f:
            text = f.read()
    if text is None or generated_for(directory, text) is not None:
        # the card save_pretrained wrote (any name), named for the repository, without local backbone paths
        text = model_card(directory, repo_id, published=True)
    if tables:
        intro = "Few-shot results measured with `flamingo eval` (mean ± std over trials, in percent):"
        text = text.rstrip("\n") + f"\n\n## Evaluation\n\n{intro}\n\n" + "\n\n".join(tables) + "\n"
    if evals:  # the same means as the Hub's evaluation results (`model-index`)
        card = ModelCard(text)
        card.data.model_name = card.data.model_name or repo_id.split("/")[-1]
        card.data.eval_results = list(evals)
        text = str(card)
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
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
    `push_directory`'s (private, revision, commit_message, token, replace_card, results, train_config). Returns the
    commit's URL."""
    check_repo_id(repo_id)  # before a save that takes minutes for a large model
    inspect.signature(push_directory).bind(repo_id, repo_id, **kwargs)  # an unknown keyword too (a TypeError)
    if isinstance(model, Flamingo):
        with tempfile.TemporaryDirectory() as tmp:
            directory = os.path.join(tmp, repo_id.rsplit("/", 1)[-1])
            model.save_pretrained(directory, trained_only=trained_only, processor=processor)
            return push_directory(directory, repo_id, **kwargs)
    if processor is not None or trained_only:
        raise ValueError("processor and trained_only apply to a model object; a directory is pushed as saved")
    return push_directory(str(model), repo_id, **kwargs)
