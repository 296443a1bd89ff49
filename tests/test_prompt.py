"""Prompts: the exact ChatML text m4 builds, and ids equal to transformers' LlavaProcessor."""

import numpy as np
import pytest
import transformers

import m4
from m4.errors import M4Error
from m4.prompt import IMAGE, TEMPLATES, question_parts

from conftest import random_images

HEADER = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
FOOTER = "<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module", params=["gqa-tied-last-full", "mha-untied-penult-default"])
def model(request, checkpoints):
    return m4.load(checkpoints[request.param])


def processor_ids(model, text: str, n_images: int) -> list[int]:
    """What transformers' LlavaProcessor makes of the same text: the oracle for ids."""
    a = model.arch
    proc = transformers.LlavaProcessor(
        image_processor=transformers.SiglipImageProcessorPil(size={"height": a.vision.image_size, "width": a.vision.image_size}),
        tokenizer=transformers.AutoTokenizer.from_pretrained(model.path),
        patch_size=a.vision.patch_size, vision_feature_select_strategy=a.strategy,
        num_additional_image_tokens=0, image_token=IMAGE)
    return proc(text=text, images=random_images(n_images) or None)["input_ids"][0]


def test_interleaved_two_images(model):
    p = model.prompt(f"What changed between {IMAGE} and {IMAGE}?", images=random_images(2))
    assert p.text == HEADER + "What changed between <image> and <image>?" + FOOTER
    assert p.ids == processor_ids(model, p.text, 2)
    assert p.ids.count(model.arch.image_token_id) == 2 * model.arch.tokens_per_image


def test_eight_frame_video(model):
    frames = random_images(8)
    p = model.prompt("What is happening?", video=frames)
    assert p.text == HEADER + "<image>\n" * 8 + "What is happening?" + FOOTER
    assert p.ids == processor_ids(model, p.text, 8)
    # the same frames as images without placeholders go in front the same way
    assert model.prompt("What is happening?", images=frames).ids == p.ids


def test_views_in_front_and_text_only(model):
    p = model.prompt("How many red objects?", views=random_images(3))
    assert p.text == HEADER + "<image>\n" * 3 + "How many red objects?" + FOOTER
    assert model.prompt("Hello").text == HEADER + "Hello" + FOOTER


def test_anyres_tiles_take_the_placeholder(model):
    wide = np.zeros((40, 80, 3), np.uint8)  # 1:2 -> a base view and 1x2 tiles
    p = model.prompt(f"Find the star in {IMAGE} please", images=[wide], patches=True)
    assert p.text == HEADER + "Find the star in <image><image><image> please" + FOOTER
    assert p.ids == processor_ids(model, p.text, 3)


def test_placeholder_count_must_match(model):
    with pytest.raises(M4Error, match="2 <image> placeholders but 1 images"):
        model.prompt(f"{IMAGE} vs {IMAGE}", images=random_images(1))
    with pytest.raises(M4Error, match="in front"):
        model.prompt(f"What is in {IMAGE}?", video=random_images(2))


def test_mantis_denotes_images_by_number():
    t = TEMPLATES["llama3"]
    assert question_parts(t, "Compare.", 2) == [
        "(image 1: <Image>", 0, "</Image>)\n", "(image 2: <Image>", 1, "</Image>)\n", "Compare."]
    assert question_parts(t, f"Is {IMAGE} like {IMAGE}?", 2) == [
        "Is ", "(image 1: <Image>", 0, "</Image>)", " like ", "(image 2: <Image>", 1, "</Image>)", "?"]
