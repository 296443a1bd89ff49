"""The torch backend against the oracle: transformers' LlavaForConditionalGeneration
running the same checkpoint, the same ids and the same pixels."""

import json

import numpy as np
import pytest
import torch
import transformers

import m4
from m4.media import preprocess
from m4.prompt import IMAGE

from conftest import VARIANTS, random_images

QUESTIONS = {1: "Describe the scene.", 2: f"What changed between {IMAGE} and {IMAGE}?",
             3: "Which object moves left?"}


def oracle_tokens(hf, model, p, pictures, max_new_tokens):
    """transformers' greedy answer, on whatever device and dtype `hf` was loaded with."""
    pixels = torch.from_numpy(preprocess(pictures, model.processing)).to(hf.device, hf.dtype)
    ids = torch.tensor([p.ids], device=hf.device)
    out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                      max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=sorted(model.stop_ids),
                      pad_token_id=sorted(model.stop_ids)[0])
    tokens = out[0, ids.shape[1]:].tolist()
    return [t for t in tokens if t not in model.stop_ids]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n_images", [1, 2, 3])
def test_greedy_tokens_equal_transformers(checkpoints, oracle, variant, n_images):
    model = m4.load(checkpoints[variant], backend="torch")
    images = random_images(n_images, seed=n_images)
    question = QUESTIONS[n_images]
    p, pictures = model.prepare(question, images, None, None, False)
    assert p.ids.count(model.arch.image_token_id) == n_images * model.arch.tokens_per_image
    ours = list(model.tokens(question, images=images, max_new_tokens=12))
    assert len(ours) == 12  # random weights rarely stop; a short answer would test less
    assert ours == oracle_tokens(oracle(checkpoints[variant]), model, p, pictures, 12)


@pytest.mark.parametrize("variant", VARIANTS)
def test_prompt_logits_match_transformers(checkpoints, oracle, variant):
    model = m4.load(checkpoints[variant], backend="torch")
    images = random_images(2, seed=7)
    p, pictures = model.prepare(QUESTIONS[2], images, None, None, False)
    b = model.backend
    ours = b.forward(model.embed(p, pictures), 0, b.new_cache(len(p.ids)), last_only=False)
    with torch.no_grad():
        ref = oracle(checkpoints[variant])(
            input_ids=torch.tensor([p.ids]),
            pixel_values=torch.from_numpy(preprocess(pictures, model.processing))).logits[0].numpy()
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_shipped_demo_answers_as_transformers_does(oracle, held_out_synth):
    """The demo model as shipped (fp16 weights, loaded as fp32): the same greedy answer as
    transformers on one sample of each of M4-Synth's ten tasks."""
    from m4.resolve import DEMO_DIR

    model = m4.load("demo", backend="torch")
    records = json.loads((held_out_synth / "bench.json").read_text())[:10]
    for rec in records:
        question = rec["conversations"][0]["value"]
        images, patches = [held_out_synth / f for f in rec["image"]], bool(rec["metadata"].get("patches"))
        p, pictures = model.prepare(question, images, None, None, patches)
        ours = list(model.tokens(question, images=images, patches=patches, max_new_tokens=16))
        assert ours, rec["sample_id"]
        assert ours == oracle_tokens(oracle(DEMO_DIR), model, p, pictures, 16), rec["sample_id"]


def test_shipped_demo_tells_which_way_the_demo_scene_moves(oracle):
    """`make run`'s question about `m4 run --video demo` (8 frames of the demo scene): the way
    the scene's shape moves, and the same greedy answer as transformers."""
    from m4.media.demo import DemoScene
    from m4.resolve import DEMO_DIR

    model = m4.load("demo", backend="torch")
    shape = DemoScene(shapes=1).describe()[0]  # the scene `demo` plays
    question = f"Which way does the {shape['colour']} {shape['kind']} move?"
    p, pictures = model.prepare(question, None, "demo", None, False)
    ours = list(model.tokens(question, video="demo", max_new_tokens=8))
    assert ours == oracle_tokens(oracle(DEMO_DIR), model, p, pictures, 8)
    assert model.ask(question, video="demo", max_new_tokens=8).strip() == shape["direction"]


def test_clip_checkpoint_reads_its_image_processor(tmp_path, oracle):
    """A CLIP checkpoint's preprocessor_config.json decides its pixels (shortest edge, centre
    crop, CLIP's mean and std), in torch and in its bundle: answers equal transformers'
    generate on the pixels of transformers' own CLIPImageProcessor."""
    from conftest import save_tiny_checkpoint
    from m4.export.bundle import export_bundle

    ck = save_tiny_checkpoint(tmp_path / "ck", "llama-clip-mha-tied-penult-default", seed=7)
    processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(ck)
    images = random_images(2, seed=21, size=(60, 40))
    models = {"torch": m4.load(ck, backend="torch")}
    export_bundle(str(ck), tmp_path / "b")
    models["onnx"] = m4.load(tmp_path / "b")
    hf = oracle(ck)
    for name, model in models.items():
        p, pictures = model.prepare(QUESTIONS[2], images)
        pixels = processor(images=pictures, return_tensors="pt")["pixel_values"]
        ids = torch.tensor([p.ids])
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, max_new_tokens=8,
                          do_sample=False, eos_token_id=sorted(model.stop_ids), pad_token_id=sorted(model.stop_ids)[0])
        want = [t for t in out[0, ids.shape[1]:].tolist() if t not in model.stop_ids]
        assert list(model.tokens(QUESTIONS[2], images=images, max_new_tokens=8)) == want, name
        assert model.processing.crop == 32 and model.processing.mean != (0.5, 0.5, 0.5), name


def test_greedy_answers_pick_tokens_where_the_logits_are(checkpoints):
    """Greedy decoding never brings the vocabulary's logits to the host (the token id is
    picked where they are); sampling brings them. The greedy id is the argmax of the logits."""
    model = m4.load(checkpoints["gqa-tied-last-full"], backend="torch")
    calls, host = [], model.backend.host
    model.backend.host = lambda logits: calls.append(logits.shape) or host(logits)
    images = random_images(1, seed=3)
    greedy = list(model.tokens(QUESTIONS[1], images=images, max_new_tokens=6))
    assert len(greedy) == 6 and not calls
    list(model.tokens(QUESTIONS[1], images=images, max_new_tokens=6, sampling=m4.Sampling(0.7, seed=1)))
    assert calls
    b = model.backend
    p, pictures = model.prepare(QUESTIONS[1], images)
    embeds = model.embed(p, pictures)
    assert b.prefill(embeds, 0, b.new_cache(len(p.ids))).argmax(-1).tolist() == [greedy[0]] == \
        [int(b.forward(embeds, 0, b.new_cache(len(p.ids)))[-1].argmax())]
