"""`m4 eval`: accuracy of a model or bundle on a bench in LLaVA-Interleave Bench format or
Mantis-Eval's, told apart per file.

A LLaVA-Interleave Bench record: {"sample_id", "image": [paths relative to the bench's folder],
"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
"metadata": {"question_type": "multi-choice" | "open-ended", "dataset": task, "scenario": ...}}.
`metadata.patches` (M4-Synth's multi-patch samples) feeds each image as anyres tiles.

A Mantis-Eval record (its local JSON layout): {"id", "question_type": "multi-choice" |
"short-answer", "question" with `<image>` placeholders, "images": [paths relative to the
bench's folder], "options": [texts], "answer": "B" or a short answer, "category",
"data_source"}. It is asked and scored as Mantis's evaluation does (mantis/benchmark/eval.py
and templates/): the options are listed under the question with the instruction to answer with
a letter, a short-answer question asks for a "Final Answer:", images missing a placeholder go
in front. The answer is what follows "Final Answer:", "the answer is" or "Answer:" when
present; multiple choice is right when its first letter (or the letter after "Answer: ") is
the reference's, or, where that letter names no option, when the answer is the right option's
text; a short answer is right when it equals the reference ignoring case and surrounding
spaces. Its accuracy is reported per question type (`by_task`), under scenario "multi-image".

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
from dataclasses import dataclass
from pathlib import Path

from m4.errors import M4Error
from m4.jsonio import read_json_list
from m4.prompt import IMAGE

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
    """A LLaVA-Interleave Bench answer's score."""
    if question_type == "multi-choice":
        return score_choice(question, reference, prediction)
    if question_type == "open-ended":
        return score_open(reference, prediction)
    raise M4Error(f"unknown question_type {question_type!r}: use multi-choice or open-ended")


def mantis_answer(prediction: str) -> str:
    """The part of an answer after Mantis-Eval's first answer marker, or all of it."""
    low = prediction.lower()
    for marker in ("final answer:", "the answer is", "answer:"):
        if marker in low:
            return prediction[low.index(marker) + len(marker):].strip()
    return prediction.strip()


def score_mantis(question_type: str, options: list[str], reference: str, prediction: str) -> float:
    """A Mantis-Eval answer's score, as Mantis's evaluation scores it."""
    answer = mantis_answer(prediction)
    if question_type == "short-answer":
        return float(answer.lower() == reference.strip("()\n ").lower())
    if question_type != "multi-choice":
        raise M4Error(f"unknown question_type {question_type!r}: use multi-choice or short-answer")
    right = next((c.upper() for c in reference.strip("()\n ") if c.isalpha()), None)
    if right is None:
        raise M4Error(f"multi-choice reference {reference!r} does not name an option letter")
    m = re.match(r"Answer: ([A-Z])", answer)
    picked = m.group(1) if m else next((c.upper() for c in answer if c.isalpha()), None)
    if picked is not None and 0 <= ord(picked) - ord("A") < len(options):
        return float(picked == right)
    k = ord(right) - ord("A")  # no option picked by letter: the right option's text, written out
    if k >= len(options):
        return 0.0
    text = re.sub(rf"^(\({right}\)|{right}[.:])", "", options[k].strip()).strip()
    return float(prediction.strip() == text)


@dataclass
class Sample:
    """One bench question in either layout, as asked and as scored."""
    id: object
    task: str
    scenario: str
    kind: str  # question type
    question: str  # as asked of the model
    reference: str
    images: list[str]
    patches: bool = False
    options: list[str] | None = None  # a Mantis-Eval record's; None for LLaVA-Interleave Bench

    def score(self, prediction: str) -> float:
        if self.options is None:
            return score(self.kind, self.question, self.reference, prediction)
        return score_mantis(self.kind, self.options, self.reference, prediction)


MANTIS_CHOICE = "{question}\nAnswer with the option's letter from the given choices directly."
MANTIS_SHORT = ("Given the images, answer the following short answer vqa question:\nQ: {question}\n"
                'You can first give your analysis, and then give your final answer as "Final Answer:"')


def llava_sample(rec: dict, i: int) -> Sample:
    meta = rec.get("metadata") or {}
    images = rec.get("image") or []
    return Sample(rec.get("sample_id", i), meta.get("dataset", "unknown"), meta.get("scenario", "unknown"),
                  meta.get("question_type", "open-ended"), rec["conversations"][0]["value"],
                  rec["conversations"][1]["value"], [images] if isinstance(images, str) else list(images),
                  bool(meta.get("patches")))


def mantis_sample(rec: dict, i: int) -> Sample:
    kind, question, options = rec["question_type"], rec["question"], list(rec.get("options") or [])
    images = rec.get("images") or []
    images = [images] if isinstance(images, str) else list(images)
    if kind == "multi-choice":
        for k, option in enumerate(options):
            letter = chr(ord("A") + k)
            # options that carry their own letter are listed as they are
            labelled = any(letter + c in option.upper() for c in ").:")
            question += f"\n {option}" if labelled else f"\n ({letter}) {option}"
        question = MANTIS_CHOICE.format(question=question)
    elif kind == "short-answer":
        question = MANTIS_SHORT.format(question=question)
    missing = len(images) - question.count(IMAGE)
    if 0 < missing < len(images):  # some placeholders given: the rest go in front, as Mantis does
        question = IMAGE * missing + question
    return Sample(rec.get("id", i), kind, "multi-image", kind, question, str(rec["answer"]), images,
                  options=options)


MANTIS_FIELDS = {"question_type", "question", "answer"}


def to_samples(records: list, where: str = "bench") -> list[Sample]:
    """Records of one layout, told by their fields, as samples."""
    def all_have(test) -> bool:
        return all(isinstance(r, dict) and test(r) for r in records)

    if all_have(lambda r: len(r.get("conversations", [])) >= 2):
        return [llava_sample(r, i) for i, r in enumerate(records)]
    if all_have(lambda r: MANTIS_FIELDS <= r.keys()):
        return [mantis_sample(r, i) for i, r in enumerate(records)]
    raise M4Error(f"{where}: expected a list of LLaVA-Interleave Bench records (with conversations) or of "
                  "Mantis-Eval records (with question_type, question, images, answer)")


def load_bench(path: Path) -> list[Sample]:
    return to_samples(read_json_list(path, "bench"), str(path))


def summarise(rows: list[tuple[str, str, float]]) -> dict:
    """(task, scenario, score) rows -> overall and grouped accuracies."""
    def mean(scores):
        return round(sum(scores) / len(scores), 6)

    groups: dict[str, defaultdict[str, list[float]]] = {"by_scenario": defaultdict(list), "by_task": defaultdict(list)}
    for task, scenario, s in rows:
        groups["by_task"][task].append(s)
        groups["by_scenario"][scenario].append(s)
    return {"overall": mean([s for *_, s in rows]) if rows else 0.0,
            **{k: {name: mean(v) for name, v in sorted(g.items())} for k, g in groups.items()}, "n": len(rows)}


def chance(samples: list[Sample]) -> dict:
    """Per sample, the score its task's best constant answer gets; summarised like accuracy."""
    by_task = defaultdict(list)
    for s in samples:
        by_task[s.task].append(s)
    rows = []
    for group in by_task.values():
        answers = sorted({s.reference for s in group})
        best = max(([s.score(a) for s in group] for a in answers), key=sum)
        rows += [(s.task, s.scenario, x) for s, x in zip(group, best)]
    return summarise(rows)


def evaluate(model: str, bench: Path, image_root: Path | None = None, limit: int | None = None,
             max_new_tokens: int = 64, backend: str = "auto", device: str = "cpu", on_sample=None) -> dict:
    """Ask every question of the bench and score the answers; `on_sample(i, n)` follows progress."""
    import m4

    todo = load_bench(bench)[:limit]
    root = Path(image_root or Path(bench).parent)
    m = m4.load(model, backend=backend, device=device)
    rows, failed, samples, scored = [], [], [], []
    for i, x in enumerate(todo):
        try:
            answer = m.ask(x.question, images=[root / p for p in x.images] or None, patches=x.patches,
                           max_new_tokens=max_new_tokens)
            s = x.score(answer)
            rows.append((x.task, x.scenario, s))
            samples.append({"sample_id": x.id, "answer": answer, "reference": x.reference, "score": s})
            scored.append(x)
        except M4Error as e:  # a broken sample is reported, not scored
            failed.append(f"{x.id}: {e}")
        if on_sample:
            on_sample(i + 1, len(todo))
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
