"""m4 train: M4-Synth -> training -> a checkpoint that transformers and m4 load and agree on;
prompts equal to inference's in both placements; bad records skipped; exact resume; FSDP on
two CPU ranks equal to one process; the dry run of a 7B preset."""

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file

import m4
from m4.media import preprocess
from m4.model.checkpoint import random_checkpoint
from m4.model.config import PRESETS
from m4.media.demo import COLOURS
from m4.records import Skipped, in_front, load_records, problem, turns
from m4.train.data import IGNORE, Batches, Collate, InstructData, approx_length
from m4.train.synth import TASKS, make, place, read_description, views_scene
from m4.train.trainer import TrainConfig, build, dry_run, train

TESTS = Path(__file__).parent
# one thread: these models are tiny, and on two shared cores idle OpenMP threads spinning
# against other processes make a step ten times slower
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def m4cli(*args):
    return subprocess.run([sys.executable, "-m", "m4", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=ONE_THREAD)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "m4synth"
    r = m4cli("data", "synth", out, "--n", "40", "--bench", "10", "--seed", "3")
    assert r.returncode == 0, r.stderr
    return out


def mean(xs):
    return sum(xs) / len(xs)


def test_synth_then_train_tiny_loss_falls_and_both_loaders_agree(synth, tmp_path):
    out = tmp_path / "tiny"
    # batches of 16: a batch of 4 mixes 5-token answers with 60-token captions, and one
    # batch's loss then swings by 20% either way, more than the bound's margin
    r = m4cli("train", "--preset", "tiny", "--data", synth / "train.json", "--out", out, "--steps", "30",
              "--batch-size", "16")
    assert r.returncode == 0, r.stderr
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == list(range(1, 31))
    assert all(e["tokens_per_s"] > 0 and e["lr"] > 0 for e in log)
    losses = [e["loss"] for e in log]
    assert mean(losses[-3:]) <= 0.7 * mean(losses[:3]), losses
    both_loaders_agree(out, synth)


def both_loaders_agree(out, synth):
    """transformers and m4.load give the same greedy answer from checkpoint `out`."""
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(out).eval()
    model = m4.load(out)
    rec = next(r for r in json.loads((synth / "bench.json").read_text()) if r["metadata"]["dataset"] == "diff-move")
    question, images = rec["conversations"][0]["value"], [synth / p for p in rec["image"]]
    ids = torch.tensor([model.prompt(question, images=images).ids])
    pixels = torch.from_numpy(preprocess([str(p) for p in images], model.arch.vision.image_size))
    stop = sorted(model.stop_ids)
    ref = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, max_new_tokens=12,
                      do_sample=False, eos_token_id=stop, pad_token_id=stop[0])[0, ids.shape[1]:].tolist()
    ref = [t for t in ref if t not in model.stop_ids]
    assert ref, "the trained model answered nothing"
    assert list(model.tokens(question, images=images, max_new_tokens=12)) == ref
    assert model.ask(question, images=images, max_new_tokens=12) == model.tokenizer.decode(ref)
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "tiny"
    random_checkpoint("tiny", path)
    return m4.load(path)


def data_set(model, records, root, **kw):
    a = model.arch
    return InstructData(records, root, model.tokenizer, model.template, a.image_token_id, a.vision.image_size,
                        tokens_per_image=a.tokens_per_image, **kw)


def collate(model, items):
    return Collate(model.arch.image_token_id, model.arch.tokens_per_image, 0)(items)


def save_images(root, n, seed=0):
    rng = np.random.default_rng(seed)
    names = [f"img{i}.png" for i in range(n)]
    for name in names:
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / name)
    return names


def test_both_placements_equal_inference_prompts_with_labels_on_answers_only(tiny, tmp_path):
    names = save_images(tmp_path, 2)
    question, answer = "Is <image> brighter than <image>?", "No, it is darker."
    rec = {"id": "r", "image": names, "conversations": [{"from": "human", "value": question},
                                                        {"from": "gpt", "value": answer}]}
    reply = tiny.tokenizer.encode(answer) + [tiny.tokenizer.token_id("<|im_end|>")]
    layouts = {}
    for prob, asked in ((0.0, question), (1.0, in_front(question))):
        batch = collate(tiny, [data_set(tiny, [rec], tmp_path, in_front_prob=prob)[(0, 0)]])
        prompt = tiny.prompt(asked, images=[tmp_path / n for n in names]).ids
        assert batch["input_ids"][0].tolist() == prompt + reply
        assert batch["labels"][0].tolist() == [IGNORE] * len(prompt) + reply
        np.testing.assert_array_equal(batch["pixel_values"].numpy(), preprocess([tmp_path / n for n in names], 32))
        layouts[prob] = prompt
    assert in_front(question) == "Is brighter than?"
    image = tiny.arch.image_token_id
    first_text = [i for i, t in enumerate(layouts[1.0]) if t == image][-1]  # in front: all images, then text
    assert layouts[1.0][first_text + 1:].count(image) == 0
    assert layouts[0.0] != layouts[1.0] and layouts[0.0].count(image) == layouts[1.0].count(image) == 2 * 16
    # the 50/50 mix draws both layouts for the same record over epochs, the same on every call
    mixed = data_set(tiny, [rec], tmp_path, in_front_prob=0.5)
    seen = {tuple(collate(tiny, [mixed[(0, e)]])["input_ids"][0].tolist()) for e in range(16)}
    assert seen == {tuple(layouts[0.0] + reply), tuple(layouts[1.0] + reply)}
    assert mixed[(0, 5)].ids == mixed[(0, 5)].ids


def test_multi_turn_and_video_records(tiny, tmp_path):
    from m4.media import write_video

    frames = [np.full((32, 32, 3), 30 * i, dtype=np.uint8) for i in range(6)]
    write_video(tmp_path / "clip.mp4", frames, fps=6)
    names = save_images(tmp_path, 1)
    records = [
        {"id": "turns", "image": names[0], "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "Noise."},
            {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]},
        {"id": "video", "video": "clip.mp4", "conversations": [
            {"from": "human", "value": "<image>\nWhat happens?"}, {"from": "gpt", "value": "It gets brighter."}]},
    ]
    ds = data_set(tiny, records, tmp_path, frames=4, in_front_prob=0.0)
    end = tiny.tokenizer.token_id("<|im_end|>")
    x = collate(tiny, [ds[(0, 0)]])
    labels = [t for t in x["labels"][0].tolist() if t != IGNORE]
    assert labels == tiny.tokenizer.encode("Noise.") + [end] + tiny.tokenizer.encode("Yes.") + [end]
    ids = x["input_ids"][0].tolist()
    second = tiny.tokenizer.encode("\n<|im_start|>user\n") + tiny.tokenizer.encode("Sure?")
    assert any(ids[i:i + len(second)] == second for i in range(len(ids)))
    v = collate(tiny, [ds[(1, 0)]])
    prompt = tiny.prompt("What happens?", video=[f for f in frames[:4]]).ids  # frames in front
    assert v["input_ids"][0].tolist()[:len(prompt)] == prompt
    assert v["pixel_values"].shape == (4, 3, 32, 32)


def test_bad_records_are_skipped_with_a_count_and_reasons(synth, tmp_path, capsys):
    good = [r for r in json.loads((synth / "train.json").read_text()) if "image" in r][:6]
    (tmp_path / "broken.png").write_bytes(b"not a png")
    conv = good[0]["conversations"]
    bad = [
        {**good[0], "id": "no-file", "image": ["media/nope.png", good[0]["image"][1]]},
        {**good[0], "id": "marks", "conversations": [{"from": "human", "value": "no placeholders"}, conv[1]]},
        {"id": "empty", "image": good[0]["image"], "conversations": []},
        "not a record",
        {"id": "corrupt", "image": [str(tmp_path / "broken.png")],
         "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Nothing."}]},
    ]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(good + bad))
    skipped = Skipped()
    records = load_records(data, synth, skipped)
    assert len(records) == 7 and skipped.total == 4
    assert set(skipped.counts) == {"missing image", "placeholders", "empty conversation", "bad record"}
    assert "record no-file: missing image media/nope.png" in skipped.first
    train(TrainConfig("tiny", data=data, out=tmp_path / "out", image_root=synth, steps=2, batch_size=4))  # an epoch
    err = capsys.readouterr().err
    assert "skipped 4 records" in err and "record marks: 0 <image> placeholders for 2 images" in err
    assert "skipped 5 records" in err and "record corrupt: cannot decode image" in err  # found when decoded
    assert json.loads((tmp_path / "out" / "log.jsonl").read_text().splitlines()[-1])["skipped"] == 5
    with pytest.raises(m4.M4Error, match="no trainable records"):
        (tmp_path / "bad.json").write_text(json.dumps(bad[:4]))
        train(TrainConfig("tiny", data=tmp_path / "bad.json", out=tmp_path / "out2", image_root=synth, steps=1))


def weights(path):
    return load_file(Path(path) / "model.safetensors")


@pytest.mark.parametrize("tune", ["projector,decoder", "projector,decoder,vision"])
def test_resume_continues_exactly_where_it_stopped(synth, tmp_path, tune):
    # with the tower tuned, its post-layernorm (after the feature layer) never has a gradient
    # and so no AdamW state in the checkpoint
    common = dict(data=synth / "train.json", batch_size=2, save_every=2, keep=1, tune=tune)
    train(TrainConfig("tiny", out=tmp_path / "whole", steps=5, **common))
    assert torch.tensor([1e-39]).mul(1.0).item() == 0.0  # a CPU run flushes subnormals (the trainer says why)
    train(TrainConfig("tiny", out=tmp_path / "split", steps=2, **common))
    assert (tmp_path / "split" / "checkpoint-0000002" / "trainer_state.json").is_file()
    train(TrainConfig("tiny", out=tmp_path / "split", steps=5, **common))
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "split")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-7)
    steps = [json.loads(line)["step"] for line in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in (tmp_path / "split").glob("checkpoint-*")) == ["checkpoint-0000005"]


def test_two_fsdp_ranks_equal_one_process_on_their_union(synth, tmp_path):
    """torchrun, 2 CPU ranks (gloo), batch 1 each, vs one process with batch 2. Half the
    records are text only, so that ranks meet batches with and without images."""
    records = json.loads((synth / "train.json").read_text())[:5]  # odd: one step has one of each
    records += [{"id": f"text{i}", "conversations": [{"from": "human", "value": f"Count to {i}."},
                                                      {"from": "gpt", "value": " ".join(map(str, range(i)))}]}
                for i in range(1, 8)]
    data = synth / "mixed.json"
    data.write_text(json.dumps(records))
    lengths = [approx_length(r, 16, 8) for r in records]  # as the trainer orders them
    visual = [[any(k in records[b[0][0]] for k in ("image", "video")) for _, b in zip(range(4), Batches(
        len(records), 1, rank, 2, 0, 0, lengths))] for rank in (0, 1)]
    assert any(a != b for a, b in zip(*visual))  # a step where one rank has images and the other none
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        str(TESTS / "dist_worker.py"), str(data), str(tmp_path / "fsdp"), "4"],
                       capture_output=True, text=True, timeout=300, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-3000:]
    # lr 3e-4 (the worker's too): AdamW turns float noise on gradients that are zero in
    # theory (a key bias's) into updates of up to lr x noise / eps, under the tolerance here
    one = train(TrainConfig("tiny", data=data, out=tmp_path / "one", steps=4, batch_size=2, lr=3e-4)).state_dict()
    ranks = [load_file(tmp_path / "fsdp" / f"rank{i}.safetensors") for i in range(2)]
    fresh = build("tiny", None, load_records(data, synth, Skipped()), 0)[0].state_dict()
    assert ranks[0].keys() == ranks[1].keys() == one.keys()
    for k in one:
        assert torch.equal(ranks[0][k], ranks[1][k]), k
        torch.testing.assert_close(ranks[0][k], one[k], rtol=0, atol=1e-5)
    assert max((one[k] - fresh[k.removeprefix("llava.")]).abs().max() for k in one) > 5e-4  # it did train
    saved, single = weights(tmp_path / "fsdp"), weights(tmp_path / "one")  # rank 0 wrote the gathered checkpoint
    assert saved.keys() == single.keys()
    for k in saved:
        torch.testing.assert_close(saved[k], single[k], rtol=0, atol=1e-5)
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
              for run in ("fsdp", "one")]
    assert np.allclose(*losses, rtol=1e-5)


def test_dry_run_builds_7b_on_meta_and_plans_memory():
    r = m4cli("train", "--preset", "7b", "--dry-run", "--gpus", "8")
    assert r.returncode == 0, r.stderr
    assert "parameters" in r.stdout and "GiB" in r.stdout and "8 GPUs" in r.stdout
    plan = dry_run("7b", 8, "projector,decoder", None, None, None)
    parts = PRESETS["7b"].params()
    assert plan["trainable"] == parts["decoder"] + parts["projector"]
    assert 0 <= plan["params"] - sum(parts.values()) < 10_000  # the tower's final norm, unused by LLaVA
    mem = plan["memory_per_gpu_bytes"]
    assert mem["AdamW state (fp32, sharded)"] == 8 * plan["trainable"] / 8
    assert 10 * 2**30 < mem["total"] < 80 * 2**30


def test_frozen_tower_tuned_parts_and_gradient_checkpointing(synth, tmp_path):
    data = synth / "train.json"
    fresh = build("tiny", None, load_records(data, synth, Skipped()), 0)[0].state_dict()

    def run(name, **kw):
        return train(TrainConfig("tiny", data=data, out=tmp_path / name, steps=2, **kw)).llava.state_dict()

    def changed(state, part):
        return any(not torch.equal(v, fresh[k]) for k, v in state.items() if k.startswith(part))

    default, checkpointed = run("default"), run("ckpt", grad_ckpt=True)
    assert not changed(default, "model.vision_tower.")
    assert changed(default, "model.multi_modal_projector.") and changed(default, "model.language_model.")
    for k in default:
        torch.testing.assert_close(checkpointed[k], default[k], rtol=0, atol=1e-6)
    tower = run("tower", tune="projector,vision")
    assert changed(tower, "model.vision_tower.") and not changed(tower, "model.language_model.")
    with pytest.raises(m4.M4Error, match="--tune"):
        run("bad", tune="projector,eyes")


def test_looking_scores_own_against_another_records_images(synth, tmp_path):
    ck = tmp_path / "ck"
    random_checkpoint("tiny", ck)
    r = run_script("looking", ck, synth / "captions.json", "--n", "40")
    rows = {line.split()[0]: line.split()[1:] for line in r.stdout.splitlines()[1:]}
    assert set(rows) == set(TASKS)  # 40 records: every task has a partner of its shape
    for n, own, other, gap in rows.values():
        assert int(n) >= 1 and float(gap) == pytest.approx(float(other) - float(own), abs=2e-3)


def run_script(name: str, *args) -> subprocess.CompletedProcess:
    """Run scripts/NAME.py on one thread, as a user would; it must succeed."""
    r = subprocess.run([sys.executable, str(TESTS.parent / "scripts" / f"{name}.py"), *map(str, args)],
                       capture_output=True, text=True, timeout=300, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    return r


def script(name: str):
    """A module of scripts/ (not a package), imported as the scripts run it."""
    sys.path.insert(0, str(TESTS.parent / "scripts"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def test_probe_reads_cells_and_scores_held_out_shapes(synth, tmp_path):
    probe = script("probe")
    assert [probe.cell_tokens(3, c) for c in range(9)] == [[c] for c in range(9)]  # one token per cell
    cells = [probe.cell_tokens(8, c) for c in range(9)]  # the demo's 8 x 8 patches
    assert sorted(t for c in cells for t in c) == list(range(64)) and cells[0] == [0, 1, 2, 8, 9, 10, 16, 17, 18]
    assert read_description("a red square at top left and an orange circle at bottom.") == [
        ("red", "square", "top left"), ("orange", "circle", "bottom")]
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(200, 8)), rng.integers(0, 3, 200)
    x[np.arange(200), y] += 10  # each class far out along its own axis
    assert probe.probe(x[:100], list(y[:100]), x[100:], list(y[100:])) == 1.0
    ck = tmp_path / "ck"
    random_checkpoint("tiny", ck)
    r = run_script("probe", ck, synth, synth, "--n", "30", "--held-n", "10")
    rows = {line[:16].strip(): line[16:].split() for line in r.stdout.splitlines()[1:5]}
    assert set(rows) == {"patch embedding", "feature layer", "projector", "chance"}
    assert all(0 <= float(v) <= 1 for row in rows.values() for v in row)
    assert "captions name" in r.stdout


def added_questions(synth, kind: str, task: str, per: int, **option) -> list[dict]:
    """The questions `mix_tasks.py --per-view/--per-frame` adds (ids ending in -KIND): `per`
    for each sample of `task` (view-, motion-), whether or not its caption was drawn into the
    mix; the rest of the mix as it is without the option."""
    mix_tasks = script("mix_tasks")
    args = (str(synth / "mix.json"), [str(synth / "train.json")], 0.2, 0, {})
    plain, mixed = mix_tasks.mix(*args), mix_tasks.mix(*args, **option)
    asked = [r for r in mixed if r["id"].endswith(f"-{kind}")]
    assert sorted(r["id"] for r in mixed if r not in asked) == sorted(r["id"] for r in plain)
    assert len(asked) == per * sum(1 for r in plain if r["id"].startswith(task) and "caption" not in r["id"])
    return asked


def test_per_view_questions_count_what_each_view_shows(synth):
    asked = added_questions(synth, "view", "view-", 3, per_view=3)
    assert {r["conversations"][1]["value"] for r in asked} >= {"0", "1"}
    for r in asked:  # the answer, read from the caption, against the scene's geometry
        task, index, _ = r["id"].rsplit("-", 2)
        things, _, seen = views_scene(np.random.default_rng([3, 0, int(index)]), PRESETS["demo"].vision.image_size)
        q = r["conversations"][0]["value"]
        colour, view = q.split("How many ")[1].split()[0], int(q.split("does view ")[1].split()[0]) - 1
        assert q.count("<image>") == len(r["image"]) == len(seen)
        shown = sum(t.colour == colour and v >= 0.5 for t, v in zip(things, seen[view]))
        assert r["conversations"][1]["value"] == str(shown), (r["id"], q)


def test_per_frame_questions_place_shapes_where_the_clip_shows_them(synth):
    asked = added_questions(synth, "frame", "motion-", 2, per_frame=2)
    assert len({r["conversations"][1]["value"] for r in asked}) >= 3
    for r in asked:  # the answer, read from the caption, against the scene's geometry
        index = int(r["id"].split("-")[1])
        scene = make("motion", [3, 0, index], PRESETS["demo"].vision.image_size).info["scene"]
        q = r["conversations"][0]["value"]
        name, frame = q.split("Where is the ")[1].split(" in frame ")
        shape = next(s for s in scene.shapes if f"{s.colour} {s.kind}" == name)
        x, y = scene.center(shape, (int(frame.rstrip("?")) - 1) / scene.fps)
        assert r["video"].endswith(f"motion-{index:06d}.mp4") and q.startswith("<image>\n")
        assert r["conversations"][1]["value"] == place(x, y, scene.width, scene.height), (r["id"], q)


def test_every_shape_asks_each_clip_about_its_shapes_with_their_ways(synth, tmp_path):
    other = tmp_path / "seed4"  # a second source: the same ids (motion-000003 ...), other clips
    assert m4cli("data", "synth", other, "--n", "40", "--bench", "0", "--seed", "4").returncode == 0
    mix_tasks = script("mix_tasks")
    args = (str(tmp_path / "mix.json"), [str(synth / "train.json"), str(other / "train.json")], 0.2, 0, {"motion": 2.0})
    plain, mixed = mix_tasks.mix(*args), mix_tasks.mix(*args, every_shape=True)
    assert [r["id"] for r in mixed] == [r["id"] for r in plain]
    changed = [(p, m) for p, m in zip(plain, mixed) if p != m]
    assert changed and all(mix_tasks.task_of(m) == "motion" for _, m in changed)
    ways, seeds = set(), set()
    for p, m in changed:
        seed = 4 if m["video"].startswith("seed4/") else 3
        scene = make("motion", [seed, 0, int(m["id"].split("-")[1])], PRESETS["demo"].vision.image_size).info["scene"]
        truth = {f"Which way does the {s.colour} {s.kind} move?": s.direction for s in scene.shapes}
        ts = turns(m["conversations"])
        assert ts[0][0].startswith("<image>\n") and not any("<image>" in q for q, _ in ts[1:])
        asked = [(q.removeprefix("<image>\n"), a) for q, a in ts]
        assert (p["conversations"][0]["value"].removeprefix("<image>\n"), p["conversations"][1]["value"]) in asked
        assert len({q for q, _ in asked}) == len(asked) <= len(scene.shapes)
        assert all(truth[q] == a for q, a in asked), m["id"]  # each way against the scene's geometry
        ways.add(len({a for _, a in asked}))
        seeds.add(seed)
    assert max(ways) >= 2 and seeds == {3, 4}  # some clip's shapes go different ways: one answer for all is wrong


def test_where_frames_ask_every_shape_its_place_as_the_pixels_show(tmp_path):
    out = tmp_path / "where"
    run_script("where_frames", out, "--n", "6", "--bench", "3", "--seed", "3")
    train, bench = (json.loads((out / f"{n}.json").read_text()) for n in ("train", "bench"))
    assert all(problem(rec, out) is None for rec in train)  # the trainer takes them
    assert all(b["metadata"]["dataset"] == "where" for b in bench)
    # one question a record: in turns a later answer could be told from the cells already named
    assert all(len(rec["conversations"]) == 2 for rec in train + bench)
    asked = [(rec["image"][0], *turns(rec["conversations"])[0]) for rec in train + bench]
    assert all(q.startswith("<image>\n") for _, q, _ in asked)
    shown = {path: np.asarray(Image.open(out / path).convert("RGB")) for path, _, _ in asked}
    assert len([path for path in shown if "bench" not in path]) == 6
    for path, img in shown.items():  # every shape of a frame asked, once
        colours = [c for c, rgb in COLOURS.items() if (img == rgb).all(-1).any()]
        assert sorted(q.split("the ")[1].split()[0] for p, q, _ in asked if p == path) == sorted(colours)
    places = set()
    for path, q, a in asked:  # each answer against the pixels of the colour it asks about
        colour = q.split("the ")[1].split()[0]
        (y0, x0), (y1, x1) = (f((shown[path] == COLOURS[colour]).all(-1).nonzero(), axis=1) for f in (np.min, np.max))
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        if min(abs(v - k * 128) for v in (cx, cy) for k in (1, 2)) > 2:  # not on a cell line
            assert a == place(cx, cy, 384, 384), (path, q)
        places.add(a)
    assert len(places) >= 3


def test_lone_motion_clips_show_one_shape_moving_the_way_answered(tmp_path):
    out = tmp_path / "lone"
    run_script("lone_motion", out, "--n", "3", "--bench", "6", "--seed", "3")
    train, bench = (json.loads((out / f"{n}.json").read_text()) for n in ("train", "bench"))
    assert len(train) == 6 and all(problem(rec, out) is None for rec in train)  # a question and a caption a clip
    assert [rec["id"] for rec in train[:2]] == ["lone-motion-000000", "lone-motion-000000-caption"]
    step = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
    answers = set()
    for rec in bench:  # the way answered against the pixels of the one shape drawn
        assert rec["metadata"]["dataset"] == "lone-motion"
        (question, answer), = turns(rec["conversations"])
        colour = question.split("the ")[1].split()[0]
        frames = [np.asarray(Image.open(out / f).convert("RGB")) for f in rec["image"]]
        assert all(((f != f[0, 0]).any(-1) == (f == COLOURS[colour]).all(-1)).all() for f in frames)  # it alone
        (first, last) = (np.argwhere((f == COLOURS[colour]).all(-1)).mean(0)[::-1] for f in (frames[0], frames[-1]))
        assert np.dot(last - first, step[answer]) > 10, rec["sample_id"]
        answers.add(answer)
    assert len(answers) >= 2


def test_shuffled_captions_name_the_same_shapes_in_another_order(synth, tmp_path):
    out = tmp_path / "mix" / "shuffled.json"
    out.parent.mkdir()
    run_script("shuffle_captions", synth / "scenes.json", out, "--seed", "1")
    before, after = json.loads((synth / "scenes.json").read_text()), json.loads(out.read_text())
    assert [b["id"] for b in before] == [a["id"] for a in after]
    assert all(problem(a, out.parent) is None for a in after)  # paths rebased: the trainer finds the images
    reordered = 0
    for b, a in zip(before, after):
        assert a["conversations"][0] == b["conversations"][0]
        was, now = (read_description(x["conversations"][1]["value"]) for x in (b, a))
        assert sorted(now) == sorted(was) and now and a["conversations"][1]["value"].endswith(".")
        reordered += now != was
    assert reordered >= 3  # 40 scenes of 1-3 shapes: many have a shape out of reading order


def test_binding_probe_scores_forced_and_free_captions(tmp_path):
    binding = script("binding")
    objs = next(binding.scenes(1, 777, 96))
    assert 2 <= len(objs) <= 3 and len({place(o.x, o.y, 96, 96) for o in objs}) == len(objs)  # one shape a cell
    ck = tmp_path / "ck"
    random_checkpoint("tiny", ck)
    r = run_script("binding", ck, "--n", "3")
    shapes = int(r.stdout.split(": ")[1].split()[0])
    forced, chance, free = (float(x) for x in re.findall(r"\d\.\d{3}", r.stdout))
    assert 6 <= shapes <= 9 and chance == round(3 / shapes, 3) and 0 <= forced <= 1 and 0 <= free <= 1


def test_motion_probe_reads_directions_and_runs(tmp_path):
    probe = script("motion_probe")
    assert probe.direction("top left", "top right") == "right" and probe.direction("centre", "top left") == "left"
    assert probe.direction("top", "bottom right") == "down" and probe.direction("left", "left") is None
    assert probe.direction("left", "nowhere") is None
    snapped = probe.snap(probe.Obj("circle", "red", 40.0, 70.0, 5.0), 96)  # cell (1, 2): centre (48, 80)
    assert (snapped.x, snapped.y) == (48.0, 80.0)
    ck = tmp_path / "ck"
    random_checkpoint("tiny", ck)
    r = run_script("motion_probe", ck, "--n", "1")
    *rates, rmse, reach = [float(line.split()[-1]) for line in r.stdout.splitlines()[1:]]
    assert len(rates) == 9 and all(0 <= v <= 1 for v in rates)
    assert 0 < rmse < 32 and reach > 1e-5  # a random checkpoint's answer does depend on the colour (~1e-3;
    # the shipped model's: ~1e-6, docs/training.md)


def test_place_readout_finds_a_place_the_tokens_hold_and_none_they_do_not():
    probe = script("motion_probe")

    class Tokens:  # stands in for a vision tower: one token per frame, given by `token`
        arch = SimpleNamespace(vision=SimpleNamespace(image_size=96))

        def __init__(self, token):
            self.token = token

        def encode(self, frames):
            return np.stack([self.token(np.asarray(f)) for f in frames])[:, None]

    def centroid(a):  # where the frame differs from the background, in 96-px units
        ys, xs = np.nonzero((a != a[0, 0]).any(-1))
        return np.array([xs.mean(), ys.mean()]) / 4

    noise = np.random.default_rng(1)
    held = probe.place_readout(Tokens(centroid), 384, n=400)
    lost = probe.place_readout(Tokens(lambda a: noise.normal(size=8)), 384, n=400)
    assert held < 1.5 and lost > 15  # a guess at the middle of 96 px misses by ~24


def test_token_places_selects_by_colour_only_where_tokens_say_their_place(tmp_path):
    places = script("token_places")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 2000)
    assert places.explained(np.eye(4)[labels] * 10 + rng.normal(size=(2000, 4)), labels) > 0.9
    assert places.explained(rng.normal(size=(2000, 4)), labels) < 0.01
    # 400 frames of 9 tokens, two shapes each: the asked colour marks its cell's token
    n, d = 400, 16
    tokens = (0.3 * rng.normal(size=(n, 9, d))).astype(np.float32)
    asked = []
    for f in range(n):
        for colour, cell in zip(rng.choice(8, 2, replace=False), rng.choice(9, 2, replace=False)):
            tokens[f, cell, colour] += 3
            asked.append((f, colour, 0, cell))
    asked = np.array(asked)
    alone, placed = places.selection(asked, tokens, False), places.selection(asked, tokens, True)
    assert alone < 0.3 and placed > 0.9  # the head finds the token; only the index says where it is
    ck, out, added = tmp_path / "ck", tmp_path / "scaled", tmp_path / "added"
    random_checkpoint("demo", ck)

    def run(*flags):
        r = run_script("token_places", ck, "--n", "40", *flags)
        return r

    r = run("--scale", "5", "--save", out)
    shares = [float(w.rstrip(",")) for w in r.stdout.splitlines()[0].split()[-5::2]]
    rates = [float(w.rstrip(";")) for w in r.stdout.splitlines()[1].split() if w[0].isdigit()]
    assert len(shares) == 3 and len(rates) == 2 and all(0 <= v <= 1 for v in shares + rates)
    def positions(path):  # the vision tower's position embeddings, whatever prefix the layout gives them
        return next(v for k, v in load_file(path / "model.safetensors").items() if k.endswith("position_embedding.weight"))
    assert torch.allclose(positions(out), 5 * positions(ck))
    run("--add", "3", "--save", added)
    extra = positions(added) - positions(ck)  # one direction of norm 3 for each position, all orthogonal
    assert torch.allclose(extra @ extra.T, 9 * torch.eye(9), atol=1e-3)
    # along them the patch embedding hardly varies on demo frames it was not fitted on
    tower = transformers.LlavaForConditionalGeneration.from_pretrained(ck).model.vision_tower.embeddings
    frames = [places.render(places.frame(5, 0, i, 4), places.SIZE, places.SIZE) for i in range(40)]
    with torch.no_grad():
        patches = tower.patch_embedding(torch.from_numpy(preprocess(frames, 96))).flatten(2).transpose(1, 2).flatten(0, 1)
    spread = lambda directions: (patches @ directions.T).var(0).mean()  # noqa: E731
    assert spread(extra / 3) < 0.1 * spread(torch.nn.functional.normalize(torch.randn(9, patches.shape[1]), dim=-1))
    assert m4.load(str(out)).ask("Where is the red circle?", images=[np.zeros((96, 96, 3), np.uint8)],
                                 max_new_tokens=2) is not None  # tokenizer and template came along


def test_refined_patches_embed_the_upscaled_image_and_load_in_both(synth, tmp_path):
    def refine(out, patch):
        return subprocess.run([sys.executable, str(TESTS.parent / "scripts" / "refine_patches.py"), src, out,
                               "--patch", str(patch)], capture_output=True, text=True, timeout=120, env=ONE_THREAD)

    src, out = tmp_path / "src", tmp_path / "fine"
    random_checkpoint("tiny", src, std=0.5)  # 32-px images, 8-px patches
    r = refine(out, 4)
    assert r.returncode == 0, r.stderr
    old, new = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    key = next(k for k in old if k.endswith("patch_embedding.weight"))
    x = torch.rand(2, 3, 32, 32)
    upscaled = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    torch.testing.assert_close(torch.nn.functional.conv2d(x, new[key], stride=4),
                               torch.nn.functional.conv2d(upscaled, old[key], stride=8))
    assert new[key.replace("patch_embedding", "position_embedding")].shape[0] == 64  # 8 x 8 patches
    model = both_loaders_agree(out, synth)
    assert model.arch.tokens_per_image == 64
    r = refine(tmp_path / "x", 3)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("error:") and not (tmp_path / "x").exists()
