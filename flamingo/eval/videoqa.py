"""Video QA (MSRVTT-QA / iVQA layout): generate a short answer, scored after VQA normalisation: exact match with
`answer`, or, for a record with several human `answers` (iVQA's five), iVQA's accuracy min(1, matches / 2).

Files: `{train,test}_qa.json`, a list of `{"id", "question", "answer" or "answers": [...], "video" or "video_id"}`.
A record's clip is its `video` path (relative to the directory), else found in `videos/` by its `video_id` as
`{video_id}.mp4` or as MSR-VTT names its clips, `video{video_id}.mp4` (any video extension). MSVD-QA's integer
`video_id`s name YouTube clips only through its `youtube_mapping.txt`, which is not read: give its records `video`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .task import Sample, Task, episode_fields, has_text, list_field, media_path, percent, read_json_records
from .vqa_metric import normalize_answer, postprocess_vqa_generation


class VideoQATask(Task):
    name = "videoqa"
    template = "<image>Question:{question} Answer:{answer}<|endofchunk|>"
    metrics = ("accuracy",)
    requires = ("av",)
    max_new_tokens = 5
    num_beams = 3

    def load(self, data_dir: str, split: str) -> list[Sample]:
        root = Path(data_dir)
        path = root / f"{split}_qa.json"
        records = read_json_records(path, "question records")
        clips = _clips(root / "videos")
        samples = []
        for rec in records:
            video = rec.get("video") or _clip_of(clips, rec["video_id"])
            answers = [str(a) for a in _answers(rec, path)]
            # a record's `answer`, else (none, null or blank: VQA's fallback too) its most given one with text
            answer = str(rec["answer"]) if has_text(rec.get("answer")) else \
                max(filter(has_text, answers), key=answers.count)
            samples.append(Sample(id=str(rec["id"]), media=[media_path(root, video)],
                                  fields={"question": rec["question"]}, answer=answer, references=answers,
                                  **episode_fields(rec)))
        return samples

    def postprocess(self, text: str) -> str:
        return postprocess_vqa_generation(text)

    def compute_metrics(self, samples: Sequence[Sample], predictions: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return {"accuracy": percent([answer_score(p["prediction"], s.references)
                                     for s, p in zip(samples, predictions)])}


def _answers(rec: dict[str, Any], path: Path) -> list[Any]:
    """A record's human `answers` (a list of strings or numbers), else its one `answer`. A record with none that has
    text is refused, as VQA refuses it: scored against "None" or "", a model answering "none" or nothing would score
    100% on an unlabeled split."""
    answers = rec.get("answers")
    if answers:
        answers = list_field(path, f"record {rec.get('id')!r}", answers, "answers", "a list of answer strings",
                             (str, int, float))
    else:
        answers = [rec.get("answer")]
    if not any(has_text(a) for a in answers):
        raise ValueError(f"{str(path)!r}: record {rec.get('id')!r} has no answer (neither 'answers' nor 'answer'): "
                         "an unlabeled split cannot be scored")
    return answers


def _clips(folder: Path) -> dict[str, str]:
    """The video files of `folder` by stem (listed once per split); of two with one stem, the earlier extension of
    `VIDEO_EXTENSIONS` (mp4 first)."""
    from ..processing import VIDEO_EXTENSIONS  # torch: not at import, so `flamingo --help` stays light

    if not folder.is_dir():
        return {}
    files = [p for p in folder.iterdir() if p.suffix.lower() in VIDEO_EXTENSIONS]
    files.sort(key=lambda p: (VIDEO_EXTENSIONS.index(p.suffix.lower()), p.name), reverse=True)
    return {p.stem: p.name for p in files}  # the preferred file written last


def _clip_of(clips: dict[str, str], video_id: Any) -> str:
    """`videos/{video_id}.mp4` (any video extension), else MSR-VTT's `videos/video{video_id}.mp4`; found by neither:
    `videos/{video_id}.mp4`, which the evaluation counts as missing."""
    name = clips.get(f"{video_id}") or clips.get(f"video{video_id}") or f"{video_id}.mp4"
    return f"videos/{name}"


def answer_score(prediction: str, answers: Sequence[str]) -> float:
    """One answer: exact match after normalisation; several (iVQA): min(1, the answers it matches / 2)."""
    prediction = normalize_answer(prediction)
    matches = sum(prediction == normalize_answer(a) for a in answers)
    return float(matches > 0) if len(answers) == 1 else min(1.0, matches / 2)
