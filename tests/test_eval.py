"""m4 eval: the scores (option matching, exact match, ROUGE-L), the bench's own answers scoring
1, and the command on a real checkpoint writing the JSON docs/training.md describes."""

import json
import subprocess
import sys

import numpy as np
import pytest

from m4.errors import M4Error
from m4.eval import chance, rouge_l, score, score_mantis, summarise, to_samples
from m4.train.synth import TASKS, synth

from test_cli import m4_in_process

QUESTION = "Which object changed colour?\nA. the red square\nB. the blue circle\nC. the green triangle\nAnswer with the letter."


@pytest.mark.parametrize("prediction, right", [
    ("B", 1), ("(B)", 1), ("B.", 1), ("B. the blue circle", 1), ("b", 0), ("The blue circle.", 1), ("blue circle", 1),
    ("A", 0), ("the red square", 0), ("", 0), ("Blue", 0), ("C) the blue circle", 0),
])
def test_multi_choice_matches_the_option_by_letter_or_text(prediction, right):
    assert score("multi-choice", QUESTION, "B", prediction) == right


def test_open_ended_exact_for_short_answers_rouge_for_long():
    assert score("open-ended", "", "red square", "The red square.") == 1
    assert score("open-ended", "", "3", "3") == 1 and score("open-ended", "", "3", "three") == 0
    assert score("open-ended", "", "left", "left, then right") == 0
    ref = "the red square moved from top left to bottom right"
    assert score("open-ended", "", ref, ref.upper() + "!") == 1
    # normalised: "red square moved from top left to bottom right" (9 words) against
    # "red square moved to right" (5 words): LCS 5, precision 1, recall 5/9
    assert score("open-ended", "", ref, "A red square moved to the right.") == pytest.approx(2 * (5 / 9) / (1 + 5 / 9))
    assert rouge_l("a b c d", "d c b a") == pytest.approx(0.25)
    assert rouge_l("a b", "") == 0


def test_summary_groups_by_task_and_scenario():
    s = summarise([("t1", "multi-image", 1.0), ("t1", "multi-image", 0.0), ("t2", "multi-view", 1.0)])
    assert s == {"overall": pytest.approx(2 / 3, abs=1e-6), "by_scenario": {"multi-image": 0.5, "multi-view": 1.0},
                 "by_task": {"t1": 0.5, "t2": 1.0}, "n": 3}


def record(task: str, kind: str, question: str, answer: str) -> dict:
    return {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
            "metadata": {"question_type": kind, "dataset": task, "scenario": "s-" + task}}


def test_chance_is_the_best_single_answer_per_task():
    records = ([record("mc", "multi-choice", QUESTION, x) for x in "AABC"]  # "A" right twice in four
               + [record("count", "open-ended", "How many?", x) for x in "1123345"]  # "3" or "1": 2 of 7
               + [record("long", "open-ended", "What?", x) for x in ("the red square moved left",
                                                                        "the red square moved right")])
    c = chance(to_samples(records))
    # the long task's best constant is either reference: 1 on itself, ROUGE-L 0.75 on the other
    assert c["by_task"] == {"mc": 0.5, "count": pytest.approx(2 / 7, abs=1e-6), "long": pytest.approx(0.875)}
    assert c["by_scenario"]["s-mc"] == 0.5
    assert c["overall"] == pytest.approx((2 + 2 + 1.75) / 13, abs=1e-6)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "m4synth"
    synth(out, n=0, bench=30, seed=1)
    return out / "bench.json"


def test_every_bench_answer_scores_one_against_itself_and_others_score_less(bench):
    records = json.loads(bench.read_text())
    for r in records:
        q, a = r["conversations"][0]["value"], r["conversations"][1]["value"]
        kind = r["metadata"]["question_type"]
        assert score(kind, q, a, a) == 1, r["sample_id"]
    answers = [r["conversations"][1]["value"] for r in records]
    for r in records:  # another sample's answer to the same task is (nearly always) wrong
        q, a = r["conversations"][0]["value"], r["conversations"][1]["value"]
        others = [x for x in answers if x != a]
        assert min(score(r["metadata"]["question_type"], q, a, x) for x in others) < 1


def test_eval_command_scores_a_checkpoint(bench, tiny_checkpoint, tmp_path):
    ck = tiny_checkpoint
    out = tmp_path / "scores.json"
    r = m4_in_process("eval", "--model", ck, "--bench", bench, "--json", out, "--limit", "10", "--max-new-tokens", "6")
    assert r.returncode == 0, r.stderr
    scores = json.loads(out.read_text())
    assert scores["n"] == 10 and scores["failed"] == 0
    assert set(scores["by_task"]) == set(TASKS)
    assert set(scores["by_scenario"]) == {s for s, _, _ in TASKS.values()}
    assert len(scores["samples"]) == 10 and "overall" in r.stdout and "chance" in r.stdout
    # each sample scored as score() scores its answer, and the accuracies are their means
    records = {rec["sample_id"]: rec for rec in json.loads(bench.read_text())}
    for s in scores["samples"]:
        rec = records[s["sample_id"]]
        q, kind = rec["conversations"][0]["value"], rec["metadata"]["question_type"]
        assert s["score"] == score(kind, q, s["reference"], s["answer"]), s
    assert scores["overall"] == pytest.approx(sum(s["score"] for s in scores["samples"]) / 10)
    by_task = {}
    for s in scores["samples"]:
        by_task.setdefault(records[s["sample_id"]]["metadata"]["dataset"], []).append(s["score"])
    assert scores["by_task"] == pytest.approx({t: sum(v) / len(v) for t, v in by_task.items()})
    assert set(scores["chance"]["by_task"]) == set(TASKS) and 0 < scores["chance"]["overall"] <= 1
    # a broken sample is counted, not fatal; a missing bench is one line
    records = json.loads(bench.read_text())[:2]
    records[0]["image"] = ["missing.png"] * len(records[0]["image"])
    broken = bench.parent / "broken.json"
    broken.write_text(json.dumps(records))
    r = m4_in_process("eval", "--model", ck, "--bench", broken, "--json", out, "--max-new-tokens", "2")
    assert r.returncode == 0 and json.loads(out.read_text())["failed"] == 1
    r = subprocess.run([sys.executable, "-m", "m4", "eval", "--model", str(ck), "--bench", str(tmp_path / "nope.json")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "bench not found" in r.stderr


def test_shipped_demo_reads_its_images(tmp_path):
    """The demo model as shipped, on 200 M4-Synth samples of a seed it never trained on, and
    on the same questions asked of another sample's images of the same task: it scores above
    the best single answer per task, and above itself when its images do not go with the
    question. docs/demo-model.md gives its full scores (600 samples)."""
    from m4.eval import evaluate

    synth(tmp_path / "m4synth", n=0, bench=200, seed=7, workers=1)
    bench = tmp_path / "m4synth" / "bench.json"
    records = json.loads(bench.read_text())
    # the next sample of the same task with as many images (views number 2-4)
    other_of = [next(o for o in records[i + 1:] + records[:i] if o["metadata"]["dataset"] == r["metadata"]["dataset"]
                     and len(o["image"]) == len(r["image"])) for i, r in enumerate(records)]
    swapped = tmp_path / "m4synth" / "swapped.json"
    swapped.write_text(json.dumps([{**r, "image": o["image"]} for r, o in zip(records, other_of)]))
    own, other = (evaluate("demo", b, max_new_tokens=24) for b in (bench, swapped))
    assert own["failed"] == other["failed"] == 0
    # a demo checkpoint that scored 0.874 here scored 0.272 with the other images (chance 0.377)
    assert own["overall"] >= own["chance"]["overall"] + 0.40, own["by_task"]
    assert own["overall"] >= other["overall"] + 0.50, (own["by_task"], other["by_task"])


# --- Mantis-Eval -----------------------------------------------------------------------------

OPTIONS = ["the red square", "the blue circle", "the green triangle"]


@pytest.mark.parametrize("prediction, right", [
    ("B", 1), ("(B)", 1), ("b", 1), ("B. the blue circle", 1), ("Final Answer: B", 1), ("The answer is (B).", 1),
    ("I looked twice. Answer: B", 1), ("A", 0), ("C) the blue circle", 0), ("", 0),
    ("Blue", 1),  # its first letter is read as the option letter, as Mantis-Eval reads it
    ("the blue circle", 1), ("The blue circle", 0),  # no option letter first: the option's exact text
])
def test_mantis_multi_choice_reads_the_option_letter(prediction, right):
    assert score_mantis("multi-choice", OPTIONS, "B", prediction) == right
    assert score_mantis("multi-choice", [f"({k}) {o}" for k, o in zip("ABC", OPTIONS)], "(B)", prediction) == right


def test_mantis_short_answer_is_exact_after_the_final_answer_marker():
    assert score_mantis("short-answer", [], "2", "2") == 1 and score_mantis("short-answer", [], "2", " 2\n") == 1
    assert score_mantis("short-answer", [], "Two", "Two cats are there. Final Answer: two") == 1
    assert score_mantis("short-answer", [], "2", "2.") == 0 and score_mantis("short-answer", [], "2", "two") == 0
    with pytest.raises(M4Error, match="unknown question_type 'open-ended'"):
        score_mantis("open-ended", [], "2", "2")
    with pytest.raises(M4Error, match="does not name an option letter"):
        score_mantis("multi-choice", OPTIONS, "42", "A")


def mantis_record(i: int, kind: str, question: str, n_images: int, answer: str, options=()) -> dict:
    return {"id": f"m{i}", "question_type": kind, "question": question,
            "images": [f"images/{i}_{k}.jpg" for k in range(n_images)], "options": list(options),
            "answer": answer, "data_source": "test", "category": "difference description"}


def test_mantis_records_are_asked_as_mantis_eval_asks_them():
    mc, short, labelled = to_samples([
        mantis_record(0, "multi-choice", "<image> Which one moved?", 2, "B", OPTIONS),
        mantis_record(1, "short-answer", "How many shapes in <image> and <image>?", 2, "(3)"),
        mantis_record(2, "multi-choice", "Which?", 3, "A", ["A. yes", "B. no"]),
    ])
    assert mc.question == ("<image><image> Which one moved?\n (A) the red square\n (B) the blue circle\n"
                           " (C) the green triangle\nAnswer with the option's letter from the given choices directly.")
    assert short.question == ("Given the images, answer the following short answer vqa question:\n"
                              "Q: How many shapes in <image> and <image>?\nYou can first give your analysis, "
                              'and then give your final answer as "Final Answer:"')
    assert labelled.question.startswith("Which?\n A. yes\n B. no\n")  # no placeholders: the template places them
    assert (mc.task, mc.scenario, short.task, mc.images) == ("multi-choice", "multi-image", "short-answer",
                                                             ["images/0_0.jpg", "images/0_1.jpg"])
    assert short.score("Final Answer: 3") == 1 and mc.score("B") == 1
    with pytest.raises(M4Error, match="LLaVA-Interleave Bench records .* or of Mantis-Eval records"):
        to_samples([mantis_record(0, "multi-choice", "Q", 1, "A", OPTIONS), {"question": "no type"}])


@pytest.fixture(scope="module")
def mantis_bench(tmp_path_factory):
    """A Mantis-Eval-shaped file: its JSON beside an images/ folder, both question types."""
    from PIL import Image

    root = tmp_path_factory.mktemp("mantis-eval")
    records = [
        mantis_record(0, "multi-choice", "<image><image> Which shape moved?", 2, "B", OPTIONS),
        mantis_record(1, "multi-choice", "Which image is brighter, <image> or <image>?", 2, "A", ["first", "second"]),
        mantis_record(2, "multi-choice", "What is common to all three?", 3, "(A)", ["colour", "shape", "size", "none"]),
        mantis_record(3, "short-answer", "How many red shapes are in <image> and <image>?", 2, "2"),
        mantis_record(4, "short-answer", "What colour is the circle in <image>?", 1, "red"),
    ]
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    for r in records:
        for p in r["images"]:
            Image.fromarray(rng.integers(0, 256, (40, 56, 3), np.uint8)).save(root / p)
    (root / "test.json").write_text(json.dumps(records))
    return root / "test.json"


def check_mantis_scores(scores: dict, bench) -> None:
    records = {r["id"]: r for r in json.loads(bench.read_text())}
    assert scores["n"] == 5 and scores["failed"] == 0
    assert set(scores["by_task"]) == {"multi-choice", "short-answer"} and set(scores["by_scenario"]) == {"multi-image"}
    by_type = {}
    for s in scores["samples"]:
        r = records[s["sample_id"]]
        assert s["reference"] == r["answer"]
        assert s["score"] == score_mantis(r["question_type"], r["options"], r["answer"], s["answer"]), s
        by_type.setdefault(r["question_type"], []).append(s["score"])
    assert scores["by_task"] == pytest.approx({k: sum(v) / len(v) for k, v in by_type.items()}, abs=1e-6)
    assert scores["overall"] == pytest.approx(sum(s["score"] for s in scores["samples"]) / 5, abs=1e-6)
    # a constant answer: "A" is right on two of the three multiple-choice questions; each short
    # answer is right on itself only
    assert scores["chance"]["by_task"] == pytest.approx({"multi-choice": 2 / 3, "short-answer": 0.5}, abs=1e-6)


def test_mantis_eval_through_evaluate_and_the_command(mantis_bench, tiny_checkpoint, tmp_path):
    from m4.eval import evaluate

    ck = tiny_checkpoint
    check_mantis_scores(evaluate(str(ck), mantis_bench, max_new_tokens=6), mantis_bench)
    out = tmp_path / "scores.json"
    r = m4_in_process("eval", "--model", ck, "--bench", mantis_bench, "--json", out, "--max-new-tokens", "6")
    assert r.returncode == 0, r.stderr
    assert "multi-choice" in r.stdout and "short-answer" in r.stdout and "chance" in r.stdout
    check_mantis_scores(json.loads(out.read_text()), mantis_bench)
