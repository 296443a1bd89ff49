"""`m4 eval`: accuracy of a model or bundle on a bench in LLaVA-Interleave Bench format.

A record: {"sample_id", "image": [paths relative to the bench's folder], "conversations":
[{"from": "human", "value": question}, {"from": "gpt", "value": answer}], "metadata":
{"question_type": "multi-choice" | "open-ended", "dataset": task, "scenario": ...}}.
`metadata.patches` (M4-Synth's multi-patch samples) feeds each image as anyres tiles.

Scores, after normalising case, punctuation and articles: multiple choice is an exact match
on the right option, given as its letter or its text; open-ended is an exact match where the
reference is a short answer (at most SHORT words) and ROUGE-L F1 where it is longer, as the
LLaVA-Interleave evaluation scores its open-ended tasks. Accuracy is the mean score per task
(`metadata.dataset`), per scenario (`metadata.scenario`, else "unknown") and overall.
The model is anything `m4.load` takes, so checkpoints and bundles are scored the same way.

Beside each accuracy stands its chance level: the score of the best single answer for the
task, the same for every sample and picked from the bench's own references (a letter for
multiple choice). A model that ignores the images but has learnt the answers' distribution
reaches it; an accuracy near it means the model does not look.
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from pathlib import Path

from m4.errors import M4Error
from m4.jsonio import read_json_list
from m4.records import as_list

SHORT = 3  # words: a reference this short is matched exactly
OPTION = re.compile(r"^\(?([A-H])[.):]\s*(.+)$", re.MULTILINE)


def normalise(text: str) -> str:
    text = text.lower().translate(str.maketrans(string.punctuation, " " * len(string.punctuation)))
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def options(question: str) -> dict[str, str]:
    """'A. the red square' lines of a multiple-choice question: letter -> option text."""
    return {m.group(1): m.group(2).strip() for m in OPTION.finditer(question)}


def letter(text: str) -> str | None:
    """The option letter an answer starts with: 'B', '(B)', 'B.', 'B: ...'."""
    m = re.match(r"\s*\(?([A-H])(?:[.):]|\s|$)", text)
    return m.group(1) if m else None


def score_choice(question: str, reference: str, prediction: str) -> float:
    right = letter(reference)
    if right is None:
        raise M4Error(f"multi-choice reference {reference!r} does not name an option letter")
    text = options(question).get(right)
    if text is not None and normalise(prediction) == normalise(text):
        return 1.0
    return float(letter(prediction) == right)


def rouge_l(reference: str, prediction: str) -> float:
    """ROUGE-L F1 over words: the longest common subsequence against both lengths."""
    r, p = reference.split(), prediction.split()
    if not r or not p:
        return 0.0
    lcs = [0] * (len(p) + 1)
    for a in r:
        prev = 0
        for j, b in enumerate(p, 1):
            prev, lcs[j] = lcs[j], prev + 1 if a == b else max(lcs[j], lcs[j - 1])
    if not lcs[-1]:
        return 0.0
    precision, recall = lcs[-1] / len(p), lcs[-1] / len(r)
    return 2 * precision * recall / (precision + recall)


def score_open(reference: str, prediction: str) -> float:
    ref, pred = normalise(reference), normalise(prediction)
    if len(ref.split()) <= SHORT:
        return float(ref == pred)
    return rouge_l(ref, pred)


def score(question_type: str, question: str, reference: str, prediction: str) -> float:
    if question_type == "multi-choice":
        return score_choice(question, reference, prediction)
    if question_type == "open-ended":
        return score_open(reference, prediction)
    raise M4Error(f"unknown question_type {question_type!r}: use multi-choice or open-ended")


def load_bench(path: Path) -> list[dict]:
    records = read_json_list(path, "bench")
    if not all(isinstance(r, dict) and len(r.get("conversations", [])) >= 2
                                                for r in records):
        raise M4Error(f"{path}: expected a list of LLaVA-Interleave Bench records with conversations")
    return records


def summarise(rows: list[tuple[str, str, float]]) -> dict:
    """(task, scenario, score) rows -> overall and grouped accuracies."""
    def mean(scores):
        return round(sum(scores) / len(scores), 6)

    groups = {"by_scenario": defaultdict(list), "by_task": defaultdict(list)}
    for task, scenario, s in rows:
        groups["by_task"][task].append(s)
        groups["by_scenario"][scenario].append(s)
    return {"overall": mean([s for *_, s in rows]) if rows else 0.0,
            **{k: {name: mean(v) for name, v in sorted(g.items())} for k, g in groups.items()}, "n": len(rows)}


def fields(rec: dict) -> tuple[str, str, str, str, str]:
    """A bench record's task, scenario, question type, question and reference answer."""
    meta = rec.get("metadata") or {}
    return (meta.get("dataset", "unknown"), meta.get("scenario", "unknown"), meta.get("question_type", "open-ended"),
            rec["conversations"][0]["value"], rec["conversations"][1]["value"])


def chance(records: list[dict]) -> dict:
    """Per sample, the score its task's best constant answer gets; summarised like accuracy."""
    by_task = defaultdict(list)
    for f in map(fields, records):
        by_task[f[0]].append(f)
    rows = []
    for samples in by_task.values():
        answers = sorted({ref for *_, ref in samples})
        best = max(([score(kind, q, ref, a) for _, _, kind, q, ref in samples] for a in answers), key=sum)
        rows += [(task, scenario, s) for (task, scenario, *_), s in zip(samples, best)]
    return summarise(rows)


def evaluate(model: str, bench: Path, image_root: Path | None = None, limit: int | None = None,
             max_new_tokens: int = 64, backend: str = "auto", device: str = "cpu", on_sample=None) -> dict:
    """Ask every question of the bench and score the answers; `on_sample(i, n)` follows progress."""
    import m4

    records = load_bench(bench)[:limit]
    root = Path(image_root or Path(bench).parent)
    m = m4.load(model, backend=backend, device=device)
    rows, failed, samples, scored = [], [], [], []
    for i, rec in enumerate(records):
        task, scenario, kind, question, reference = fields(rec)
        images = [root / p for p in as_list(rec.get("image"))]
        try:
            answer = m.ask(question, images=images or None, patches=bool((rec.get("metadata") or {}).get("patches")),
                           max_new_tokens=max_new_tokens)
            s = score(kind, question, reference, answer)
            rows.append((task, scenario, s))
            samples.append({"sample_id": rec.get("sample_id", i), "answer": answer, "reference": reference,
                            "score": s})
            scored.append(rec)
        except M4Error as e:  # a broken sample is reported, not scored
            failed.append(f"{rec.get('sample_id', i)}: {e}")
        if on_sample:
            on_sample(i + 1, len(records))
    return {**summarise(rows), "chance": {k: v for k, v in chance(scored).items() if k != "n"},
            "failed": len(failed), "failed_first": failed[:5], "model": str(model), "bench": str(bench),
            "samples": samples}


def print_scores(scores: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table("", "accuracy", "chance", title=f"{scores['n']} samples",
              caption=f"{scores['model']} on {scores['bench']}; chance: the best single answer per task")
    for group in ("by_scenario", "by_task"):
        for name, acc in scores[group].items():
            t.add_row(name, f"{acc:.3f}", f"{scores['chance'][group][name]:.3f}")
        t.add_section()
    t.add_row("overall", f"{scores['overall']:.3f}", f"{scores['chance']['overall']:.3f}")
    console = Console()
    console.print(t)
    if scores["failed"]:
        console.print(f"{scores['failed']} samples failed; first: " + "; ".join(scores["failed_first"]))
