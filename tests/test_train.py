"""m4 train: M4-Synth -> training -> a checkpoint that transformers and m4 load and agree on;
prompts equal to inference's in both placements; bad records stop a run or, with --skip-bad,
are skipped; exact resume; FSDP on two CPU ranks equal to one process; the dry run of a 7B
preset; the demo recipe's data scripts (scripts/mix_tasks.py, scripts/lone_motion.py) against
the pixels they describe."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file

import m4
from m4.media import preprocess
from m4.model.config import PRESETS
from m4.media.demo import COLOURS
from m4.records import Skipped, in_front, load_records, problem, turns
from m4.train.data import IGNORE, Batches, Collate, InstructData, approx_length
from m4.train.synth import make, place, views_scene
from m4.train.trainer import TrainConfig, build, dry_run, train

from test_cli import m4_in_process

TESTS = Path(__file__).parent


def m4cli(*args):
    return subprocess.run([sys.executable, "-m", "m4", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


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
    r = m4_in_process("train", "--preset", "tiny", "--data", synth / "train.json", "--out", out, "--steps", "30",
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
    pixels = torch.from_numpy(preprocess([str(p) for p in images], model.processing))
    stop = sorted(model.stop_ids)
    ref = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, max_new_tokens=12,
                      do_sample=False, eos_token_id=stop, pad_token_id=stop[0])[0, ids.shape[1]:].tolist()
    ref = [t for t in ref if t not in model.stop_ids]
    assert ref, "the trained model answered nothing"
    assert list(model.tokens(question, images=images, max_new_tokens=12)) == ref
    assert model.ask(question, images=images, max_new_tokens=12) == model.tokenizer.decode(ref)
    return model


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return m4.load(tiny_checkpoint)


def data_set(model, records, root, **kw):
    a = model.arch
    return InstructData(records, root, model.tokenizer, model.template, a.image_token_id, model.processing,
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


def test_bad_records_stop_training_or_are_skipped_with_a_count_and_reasons(synth, tmp_path, capsys):
    good = [r for r in json.loads((synth / "train.json").read_text()) if "image" in r][:6]
    (tmp_path / "broken.png").write_bytes(b"not a png")
    conv = good[0]["conversations"]
    bad = [
        {**good[0], "id": "no-file", "image": ["media/nope.png", good[0]["image"][1]]},
        {**good[0], "id": "marks", "conversations": [{"from": "human", "value": "only <image>"}, conv[1]]},
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
    with pytest.raises(m4.M4Error, match="record no-file: missing image media/nope.png .*--skip-bad"):
        train(TrainConfig("tiny", data=data, out=tmp_path / "out", image_root=synth, steps=2, batch_size=4))
    train(TrainConfig("tiny", data=data, out=tmp_path / "out", image_root=synth, steps=2, batch_size=4,
                      skip_bad=True))  # an epoch
    err = capsys.readouterr().err
    assert "skipped 4 records" in err and "record marks: 1 <image> placeholders for 2 images" in err
    assert "skipped 5 records" in err and "record corrupt: cannot decode image" in err  # found when decoded
    assert json.loads((tmp_path / "out" / "log.jsonl").read_text().splitlines()[-1])["skipped"] == 5
    with pytest.raises(m4.M4Error, match="no trainable records"):
        (tmp_path / "bad.json").write_text(json.dumps(bad[:4]))
        train(TrainConfig("tiny", data=tmp_path / "bad.json", out=tmp_path / "out2", image_root=synth, steps=1,
                          skip_bad=True))


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
                       capture_output=True, text=True, timeout=300)
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
    r = m4_in_process("train", "--preset", "7b", "--dry-run", "--gpus", "8")
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


def run_script(name: str, *args) -> subprocess.CompletedProcess:
    """Run scripts/NAME.py on one thread, as a user would; it must succeed."""
    r = subprocess.run([sys.executable, str(TESTS.parent / "scripts" / f"{name}.py"), *map(str, args)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r


def script(name: str):
    """A module of scripts/ (not a package), imported as the scripts run it."""
    sys.path.insert(0, str(TESTS.parent / "scripts"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


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
