"""`Task`: one evaluation benchmark = how to read its splits, how to write a demo and a query, how to predict
(generate free text, or rank candidate answers by log-likelihood), and its metric.

Prompts follow Flamingo / OpenFlamingo: every task has one template with an `{answer}` field, e.g.
`<image>Question:{question} Short answer:{answer}<|endofchunk|>`. A demo fills `{answer}` with `answer_prefix +
answer` ("red"; classification's prefix is " ": "This is a cat."); a query is the template cut just before
`{answer}` ("...Short answer:"), so the model continues it. Ranked tasks score each candidate as the continuation
`answer_prefix + name + <rest of the template>` of the query (" cat.<|endofchunk|>"), tokenized as it follows the
query (`predict.continuation_ids_of`: the joint text's ids after the query's, as lm-eval-harness splits them).
Templates (and the prefix) can be overridden (`Task(template=..., answer_prefix=...)`) as long as they keep
`{answer}` and the task's fields. Each demo is followed by the task's `demo_separator`: "\\n" for VQA, captioning
and video captioning, as OpenFlamingo's evaluate.py writes them (`...<|endofchunk|>\\n<image>...`), "" for the
others (HatefulMemes too, as OpenFlamingo); `get_task(..., demo_separator=...)` overrides it.

Ranked candidates are ordered by their continuation's summed log-likelihood (`rank_by="sum"`, the default), or by
the mean log-likelihood of the candidate's own tokens, `answer_prefix + name` without the template's rest
(`rank_by="mean"`: OpenFlamingo's evaluate.py ranks ImageNet and HatefulMemes so, `normalize_length=True`).

Chat prompts (`task.chat`, a format of flamingo/chat.py: `flamingo eval --chat`): each demo is a user turn (its
query, the template up to `{answer}`, media in place) and an assistant turn (its answer), the query a last user turn,
all written in the model's chat format (Otter's `User: ... GPT:<answer>`, IDEFICS's `User:` / `Assistant:`), as the
model is served; a ranked candidate is scored as the assistant's answer and end marker, after the gap a demo's answer
has after that query; a generated answer is cut at the format's stop strings, as the server cuts it (`answer_text`,
a record's `raw`; `prediction` postprocesses it).
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from ..chat import ChatFormat, Turn, pieces_of
from ..config import MEDIA_TOKEN

if TYPE_CHECKING:
    from ..runtime.lru import LRU

RANK_BY = ("sum", "mean")  # how a ranked candidate's token log-likelihoods become its score (`Task.rank_by`)
CONTINUATIONS_KEPT = 1 << 16  # (query, candidate) token ids a task keeps (`Task.continuation_ids`)


@dataclass
class Sample:
    """One example of a split. `media` are absolute paths (images or videos), in prompt order."""

    id: str
    media: list[str]
    fields: dict[str, Any]  # the template's fields other than {answer} (question, text, ...)
    answer: str  # what a demo shows after the query (a human answer, a caption, a class name, "yes"/"no")
    references: list[str] = field(default_factory=list)  # what a prediction is scored against
    label: Any = None  # classification: the class name; hateful memes: 0/1
    candidates: Optional[list[str]] = None  # ranked tasks: this sample's candidates (else the task's classes)
    demo_ids: Optional[list[str]] = None  # episodes: the train-split ids of its demos, in prompt order
    # n-way episodes (concept binding): one shot is one demo of each of the `ways` classes (Frozen's inner shots),
    # so k shots take the first k * ways demo_ids; None: one demo per shot
    ways: Optional[int] = None
    kind: Optional[str] = None  # VQA: the annotation's answer type (accuracy is also reported per kind)


class Task:
    """Base class: subclasses set the class attributes and implement `load` and `compute_metrics`."""

    name: str = ""
    kind: str = "generate"  # "generate" (free text) or "rank" (log-likelihood of candidates)
    template: str = ""
    answer_prefix: str = ""  # put between the query and the answer: "Short answer:red" (OpenFlamingo's prompts)
    metrics: tuple[str, ...] = ()
    max_new_tokens: int = 5
    num_beams: int = 1
    # beam search ranks finished beams by their summed log-probability, not divided by their length (HF's default
    # 1.0 would favour longer answers and captions): OpenFlamingo's evaluate.py passes 0.0 for VQA and captioning
    length_penalty: float = 0.0
    demo_separator: str = ""  # written after each demo's prompt (before the next demo or the query)
    rank_by: str = "sum"  # ranked tasks: "sum" or "mean" (RANK_BY; the module's docstring)
    image_references: bool = False  # prompts declare their images (`Image 0 is <image0>`, flamingo/references.py)
    # third-party modules its metric or media need, checked before the model loads (eval/extras.py)
    requires: tuple[str, ...] = ()

    def __init__(self, template: Optional[str] = None, answer_prefix: Optional[str] = None,
                 rank_by: Optional[str] = None) -> None:
        self.template = template or type(self).template
        self.answer_prefix = type(self).answer_prefix if answer_prefix is None else answer_prefix
        names = [f for _, f, _, _ in string.Formatter().parse(self.template) if f is not None]
        if names.count("answer") != 1:
            raise ValueError(f"a {self.name} template needs exactly one {{answer}} field: {self.template!r}")
        self.rank_by = type(self).rank_by if rank_by is None else rank_by
        if self.rank_by not in RANK_BY:
            raise ValueError(f"rank_by must be one of {RANK_BY}, got {self.rank_by!r}")
        self.suffix = self.template[self.template.index("{answer}") + len("{answer}"):]
        if "{" in self.suffix or "}" in self.suffix:
            raise ValueError(f"nothing after {{answer}} may be a field: {self.template!r}")
        if self.template.count(MEDIA_TOKEN) != 1:
            raise ValueError(f"a template needs exactly one {MEDIA_TOKEN}: {self.template!r}")
        self.classes: list[str] = []  # ranked tasks: the default candidates, set by `load`
        # ranked tasks: (query, candidate) -> the candidate's token ids after that query (predict.continuation_ids_of);
        # bounded: a query is one sample's (VisDial: 100 candidates a round), asked again within its batch only
        from ..runtime.lru import LRU  # (it imports torch: not when the CLI only builds its parsers)

        self.continuation_ids: LRU[tuple[str, str], list[int]] = LRU(CONTINUATIONS_KEPT)
        self.chat: Optional[ChatFormat] = None  # chat prompts in this format (`use_chat`); None: the template's

    # ------------------------------------------------------------------------------------------------ data
    def load(self, data_dir: str, split: str) -> list[Sample]:
        """The "train" (demo pool) or "test" (evaluated) split of `data_dir`."""
        raise NotImplementedError

    def check_fields(self, samples: Sequence[Sample]) -> None:
        """Refuse a template that names a field the samples lack (a typo in `--template`), before any prompt."""
        names = {f for _, f, _, _ in string.Formatter().parse(self.template) if f is not None} - {"answer"}
        for sample in samples:
            missing = sorted(n for n in names if n.split(".")[0].split("[")[0] not in sample.fields)
            if missing:
                raise ValueError(f"the {self.name} template {self.template!r} names "
                                 + ", ".join(f"{{{n}}}" for n in missing)
                                 + f", which sample {sample.id!r} lacks: its fields are {sorted(sample.fields)}")

    # ---------------------------------------------------------------------------------------------- prompts
    def demo_prompt(self, sample: Sample, with_media: bool = True) -> str:
        """A solved example: the template with every field filled. Without media: its `<image>` removed (the
        zero-shot convention's text-only demos)."""
        text = self.template.format(**sample.fields, answer=self.answer_prefix + sample.answer)
        return text if with_media else text.replace(MEDIA_TOKEN, "")

    def query_prompt(self, sample: Sample) -> str:
        """The template up to `{answer}`: what the model continues."""
        return self.template[: self.template.index("{answer}")].format(**sample.fields)

    def join_prompt(self, parts: Sequence[str]) -> str:
        """The demos' prompts and the query's, in order -> the prompt."""
        return "".join(parts)

    def use_chat(self, fmt: Optional[ChatFormat]) -> None:
        """Write prompts as conversations in `fmt` (None: the template's few-shot prompts)."""
        if fmt is not None and self.image_references:
            raise ValueError(f"{self.name} declares its images (`Image 0 is <image0>`): it has no chat prompts")
        self.chat = fmt
        self.continuation_ids.clear()

    def chat_prompt(self, demos: Sequence[Sample], sample: Sample, with_media: bool = True) -> str:
        """The demos and the query as a conversation in `self.chat`, ending where the assistant answers."""
        assert self.chat is not None
        turns = []
        for demo in demos:
            query = self.query_prompt(demo)
            turns += [Turn("user", pieces_of(query if with_media else query.replace(MEDIA_TOKEN, ""))),
                      Turn("assistant", (demo.answer,))]
        return self.chat.render(turns + [Turn("user", pieces_of(self.query_prompt(sample)))])

    def continuation(self, candidate: str, prompt: Optional[str] = None) -> str:
        """Ranked tasks: the text scored after the query for one candidate answer (in chat prompts: the assistant's
        answer and end marker, after the lead the prompt already ends with, with the gap a demo's answer gets after
        that `prompt`'s end: None, a query's word). With `rank_by="mean"` only the candidate's own text is scored:
        without the template's rest (or the chat format's end marker)."""
        if self.chat is None:
            return self.answer_prefix + candidate + (self.suffix if self.rank_by == "sum" else "")
        before = ("?" + self.chat.answer_prefix()) if prompt is None else prompt
        gap, answer, end = self.chat.answer(candidate, before)
        return gap + answer + (end if self.rank_by == "sum" else "")

    def candidate_scores(self, summed: Sequence[float], continuations: Sequence[Sequence[int]]) -> list[float]:
        """Ranked tasks: each candidate's summed log-likelihood over its continuation's token ids -> its score
        (`rank_by`: the sum, or the mean per token)."""
        if self.rank_by == "sum":
            return [float(s) for s in summed]
        return [float(s) / max(len(ids), 1) for s, ids in zip(summed, continuations)]

    def candidates_for(self, sample: Sample) -> list[str]:
        candidates = sample.candidates or self.classes
        if not candidates:
            raise ValueError(f"{self.name}: sample {sample.id!r} has no candidates and the task no class list")
        return candidates

    # ------------------------------------------------------------------------------------------- predictions
    def generation_settings(self, overrides: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        """Generate tasks: the task's decoding settings with `overrides` (max_new_tokens, num_beams, ...) on top."""
        return {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams,
                "length_penalty": self.length_penalty, **(overrides or {})}

    def postprocess(self, text: str) -> str:
        """Generated text (special tokens removed) -> the prediction."""
        return first_line(text)

    def answer_text(self, text: str) -> str:
        """Generated text (special tokens removed) -> the answer's text, a record's `raw`: in chat prompts cut at the
        chat format's stop strings, where a served answer ends (mmgpt's `### End.`), so a model in-process and a server
        that stops there give the same records; else the text itself."""
        return self.chat.cut(text) if self.chat is not None else text

    def prediction(self, text: str) -> str:
        """Generated text (special tokens removed) -> the prediction: `answer_text`, then `postprocess`."""
        return self.postprocess(self.answer_text(text))

    def from_scores(self, sample: Sample, candidates: Sequence[str], scores: Sequence[float]) -> dict[str, Any]:
        """Ranked tasks: candidates' scores (`candidate_scores`) -> a prediction record (top-5 names, best first)."""
        order = sorted(range(len(candidates)), key=lambda i: -scores[i])
        return {"prediction": candidates[order[0]], "top5": [candidates[i] for i in order[:5]]}

    def compute_metrics(self, samples: Sequence[Sample], predictions: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Aligned samples and prediction records -> {metric: value} (values in percent, as the papers report)."""
        raise NotImplementedError


# ------------------------------------------------------------------------------------------------- file helpers
def _existing(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"missing evaluation file {str(path)!r}")
    return path


def read_text(path: Path) -> str:
    """A task file's text (UTF-8; a leading byte-order mark, as Notepad and Excel write, is not data); ValueError
    naming a file that is not UTF-8."""
    try:
        return _existing(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"evaluation file {str(path)!r} is not UTF-8 text ({e})") from None


def read_json(path: Path) -> Any:
    """A task file's JSON (`read_text`). Its strings are kept as written (half a surrogate pair too: the processor
    tokenizes it as U+FFFD, and a media path may be a file name Python reads with surrogate escapes)."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"evaluation file {str(path)!r} is not JSON: {e}") from None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """A task file of one JSON value a line (`read_text`), its strings kept as written (`read_json`)."""
    records = []
    for n, line in enumerate(read_text(path).split("\n"), 1):  # (not splitlines: JSON strings may hold U+2028 raw)
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"evaluation file {str(path)!r}: line {n} is not JSON: {e}") from None
    return records


def read_json_records(path: Path, what: str) -> list[dict[str, Any]]:
    """A task file holding a JSON list of objects; `what` names them in the error (`"question records"`)."""
    records = read_json(path)
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        got = f"a {type(records).__name__}" if not isinstance(records, list) else "items that are not objects"
        raise ValueError(f"{str(path)!r} must be a JSON list of {what}, got {got}")
    return records


def list_field(path: Path, where: str, value: Any, name: str, what: str,
               items: Optional[tuple[type, ...]] = None) -> list[Any]:
    """`value`, a record's field `name`, checked to be a list (of `items`, when given): a string would otherwise give
    one item per character. `where` names the record (`"record 'q1'"`), `what` the list (`"a list of strings"`)."""
    if not isinstance(value, list) or (items is not None and not all(isinstance(v, items) for v in value)):
        raise ValueError(f"{str(path)!r} {where}: '{name}' must be {what}, got {value!r:.80}")
    return value


def has_text(answer: Any) -> bool:
    """Whether a record's answer gives a reference: not null, not blank (normalised, a blank answer is the empty one,
    which a blank prediction would match)."""
    return answer is not None and bool(str(answer).strip())


def media_path(data_dir: Path, relative: str) -> str:
    """A record's media file under `data_dir`. Whether it exists is not checked here: a missing file is skipped and
    counted per query as an unreadable one is (`unreadable_media`; too many of them stop the run)."""
    if not isinstance(relative, str) or not relative:
        raise ValueError(f"a media path must be a non-empty string, got {relative!r}")
    return str(data_dir / relative)


def first_line(text: str) -> str:
    """The first line with text: after leading whitespace and line breaks, the text before the next line break of any
    kind (`str.splitlines`: also "\\r", U+2028, ...), stripped. "\\na dog\\nOutput" is "a dog"."""
    lines = text.lstrip().splitlines()
    return lines[0].strip() if lines else ""


def percent(scores: Sequence[float]) -> float:
    """100 x the mean per-sample score (0 for no samples): metrics are reported in percent, as the papers do."""
    return 100.0 * sum(scores) / max(len(scores), 1)


def per_kind(name: str, samples: Sequence[Sample], scores: Sequence[float]) -> dict[str, float]:
    """`{name}/{kind}`: the percent of each kind of sample (`Sample.kind`: VQA's answer type, a question type), for
    the samples that name one."""
    by_kind: dict[str, list[float]] = {}
    for sample, score in zip(samples, scores):
        if sample.kind is not None:
            by_kind.setdefault(str(sample.kind), []).append(float(score))
    return {f"{name}/{kind}": percent(by_kind[kind]) for kind in sorted(by_kind)}


def demo_ids_of(record: dict[str, Any]) -> Optional[list[str]]:
    ids = record.get("demo_ids")
    return None if ids is None else [str(i) for i in ids]


def episode_fields(record: dict[str, Any]) -> dict[str, Any]:
    """A test record's episode fields for `Sample`: its `demo_ids` and, for an n-way episode, its `ways`."""
    return {"demo_ids": demo_ids_of(record), "ways": ways_of(record)}


def ways_of(record: dict[str, Any]) -> Optional[int]:
    """An episode's `ways` (demos per shot); it needs `demo_ids` listed class by class, one of each per shot."""
    ways = record.get("ways")
    if ways is None:
        return None
    if isinstance(ways, bool) or not isinstance(ways, int) or ways < 1:
        raise ValueError(f"record {record.get('id')!r}: 'ways' must be a positive integer, got {ways!r}")
    if record.get("demo_ids") is None:
        raise ValueError(f"record {record.get('id')!r} has 'ways' but no 'demo_ids'")
    return ways
