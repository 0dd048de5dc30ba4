"""Where a model is read from: a local directory, or a Hugging Face Hub repository (`org/name`) downloaded once into
the hub cache (`HF_HUB_CACHE`; `HF_HUB_OFFLINE=1` reads the cache only)."""

from __future__ import annotations

import os
import re
from typing import Literal, Optional, Sequence

from .checkpoint_io import interrupted_copies

# a full commit id, the name of a snapshot in the hub cache (`models--org--name/snapshots/<commit>`)
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
# what a repository name may look like on the Hub: `org/name`, letters, digits, `-`, `_`, `.`
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
# a name with no `/`, which is a path here, never a Hub repository (what a user of `from_pretrained("gpt2")` may try)
_ONE_WORD = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}$")
# files a saved model never needs: other frameworks' weights and pickled tensors (we read safetensors only)
NEVER_READ = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx", "*.gguf")
# what a model's processor is built from, never its weights: configs (the model's, the tokenizer's, the image
# processor's), tokenizer files (sentencepiece models, BPE merges and vocabs) and chat templates
METADATA = ("*.json", "tokenizer*", "*.model", "*.txt", "*.jinja")


def is_hub_name(source: str) -> bool:
    """Whether `source` reads as a Hub repository name (`org/name`), not a path: it does not start with `/`, `.` or
    `~`, has exactly one `/` and no `..`."""
    return bool(_REPO_ID.match(source)) and ".." not in source


def local_or_hub(source: str, what: str) -> Literal["local", "hub"]:
    """"local" when `source` is a directory, "hub" when it is a Hub repository name and no local path; anything else
    (a path that does not exist, a file) is a FileNotFoundError naming `what`. A local path wins over the Hub name
    it may also read as (`org/name` relative to the working directory); a file is named as one (a torch checkpoint
    with how to convert it)."""
    source = os.fspath(source)
    if os.path.isdir(source):
        return "local"
    if is_hub_reference(source):
        return "hub"
    if os.path.isfile(source):
        hint = (": a torch checkpoint converts once, and its --out DIR loads: an OpenFlamingo checkpoint.pt with "
                "`flamingo convert open-flamingo --checkpoint FILE --vision V --lm L --out DIR`, a Multimodal-GPT "
                "LoRA file with `flamingo convert mmgpt --finetune FILE --lm L --out DIR`"
                if source.endswith((".pt", ".pth", ".ckpt", ".bin")) else "")
        raise FileNotFoundError(f"{what} {source!r} is a file, not a directory (nor a Hub repository name){hint}")
    hint = (" (a Hub repository is named org/name: the Hub's old one-word names now have an org, `gpt2` is "
            "`openai-community/gpt2`)" if _ONE_WORD.match(source) else "")
    # a save killed between its two renames (beside the directory a link names: where a save through it writes)
    if copies := interrupted_copies(source) or interrupted_copies(os.path.realpath(source)):
        hint = (f": a save killed while it replaced it left {', '.join(os.path.basename(c) for c in copies)} beside "
                "it (`.old-`: the copy saved before; `.tmp-`: the new one, whole only if the save was killed after "
                f"writing it); rename one to {os.path.basename(os.path.abspath(source))!r}")
    raise FileNotFoundError(f"{what} directory not found: {source}{hint}")


def is_hub_reference(source: str) -> bool:
    """Whether `source` names a Hub repository here: a Hub name (`is_hub_name`) that is no local path."""
    source = os.fspath(source)
    return is_hub_name(source) and not os.path.exists(source)


# a Hub dataset, or a folder of it: hf://datasets/ORG/NAME[@REVISION][/PATH]
HF_DATASET = re.compile(r"^hf://datasets/([^/@]+/[^/@]+)(?:@([^/]+))?(?:/(.*))?$")


def dataset_dir(source: str, what: str) -> str:
    """`source` as a local path: itself, or for `hf://datasets/ORG/NAME[@REVISION][/PATH]` the folder PATH of the
    dataset repository's local snapshot (downloaded whole on first use, into the hub cache)."""
    m = HF_DATASET.match(os.fspath(source))
    if m is None:
        return os.fspath(source)
    root = local_dir(m.group(1), what, revision=m.group(2), ignore_patterns=None, repo_type="dataset")
    folder = os.path.join(root, m.group(3) or "")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{what}: the Hub dataset {m.group(1)} has no folder {m.group(3)!r}")
    return folder


def local_dir(source: str, what: str, *, revision: Optional[str] = None,
              allow_patterns: Optional[Sequence[str]] = None,
              ignore_patterns: Optional[Sequence[str]] = NEVER_READ, repo_type: str = "model") -> str:
    """`source` if it is a directory, else the local snapshot of the Hub repository it names (downloaded on first use,
    only the files the patterns let through; `revision`: a branch, tag or commit). Raises FileNotFoundError naming
    `what` when it is neither (a path that does not exist, a repository that cannot be found or reached, a name
    absent from the cache when offline), and ValueError for a `revision` of a local directory: a directory has no
    revisions, and loading it would silently give another version than the one asked for."""
    source = os.fspath(source)
    if local_or_hub(source, what) == "local":
        if revision is not None:
            raise ValueError(f"revision {revision!r} (--revision) names a version of a Hub repository, and {what} "
                             f"{source!r} is a local directory: drop the revision, or pass the Hub name from "
                             "another working directory")
        return source
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    try:
        return snapshot_download(source, revision=revision, repo_type=repo_type,
                                 allow_patterns=None if allow_patterns is None else list(allow_patterns),
                                 ignore_patterns=None if ignore_patterns is None else list(ignore_patterns))
    except (HfHubHTTPError, LocalEntryNotFoundError, HFValidationError, OSError) as e:
        at = f" at revision {revision!r}" if revision else ""
        raise FileNotFoundError(f"{what} {source!r} is not a local directory, and the Hub repository of that name "
                                f"could not be read{at} ({type(e).__name__}: {str(e).splitlines()[0]})") from e


def metadata_dir(source: str, what: str, *, revision: Optional[str] = None) -> str:
    """`local_dir` of `source` with its `METADATA` files alone: what a processor is built from, never the weights."""
    return local_dir(source, what, revision=revision, allow_patterns=METADATA, ignore_patterns=None)


def snapshot_commit(directory: str) -> Optional[str]:
    """The commit a Hub snapshot directory holds (`.../snapshots/<commit>`, as `snapshot_download` returns it); None
    for any other directory."""
    path = os.path.normpath(os.fspath(directory))
    name = os.path.basename(path)
    return name if os.path.basename(os.path.dirname(path)) == "snapshots" and _COMMIT.match(name) else None


def is_commit(revision: Optional[str]) -> bool:
    """Whether `revision` is a full commit id (40 hex digits), which no later commit can move."""
    return isinstance(revision, str) and bool(_COMMIT.match(revision))


def hub_commit(source: str, what: str, *, revision: Optional[str] = None) -> str:
    """The commit the Hub repository `source` is at `revision` (a branch, tag or commit; None: its default branch):
    what a backbone named by its Hub name is pinned to, so that a trained-only checkpoint reads the same weights after
    the repository moves on. Fetches its `config.json` alone (offline: reads the hub cache); a full commit id is
    returned as it is. FileNotFoundError naming `what` when the repository cannot be read (`local_dir`)."""
    if is_commit(revision):
        return str(revision)
    if not is_hub_reference(source):
        raise ValueError(f"{what} {os.fspath(source)!r} is not a Hub repository name here: it has no commits")
    commit = snapshot_commit(local_dir(source, what, revision=revision, allow_patterns=["config.json"],
                                       ignore_patterns=None))
    if commit is None:  # not a snapshot of the hub cache: nothing to pin it to
        raise ValueError(f"the hub cache gave {what} {os.fspath(source)!r} no commit (at revision {revision!r})")
    return commit
