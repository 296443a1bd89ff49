"""Prompts: the exact ChatML text m4 builds, and ids equal to transformers' LlavaProcessor."""

import json

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
        "(image 1: <Image>", 0, "</Image>)", "(image 2: <Image>", 1, "</Image>)", "Compare."]
    assert question_parts(t, f"Is {IMAGE} like {IMAGE}?", 2) == [
        "Is ", "(image 1: <Image>", 0, "</Image>)", " like ", "(image 2: <Image>", 1, "</Image>)", "?"]


# --- Mantis (Llama-3) -----------------------------------------------------------------------

LLAMA3_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
                r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|eot_id|>", IMAGE]
# Llama-3-Instruct's chat format: BOS, then each message under its role header, content trimmed
LLAMA3_CHAT = (
    "{% for m in messages %}{% if loop.first %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + (m['content'] | trim) + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def llama3_tokenizer(tmp_path_factory):
    """A small byte-level BPE in Llama-3's shape: its split regex, its special tokens, BOS added
    by the post-processor, trained on text with Mantis's image denotations so that merges
    span the joins between them (">)(")."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, processors, trainers

    from m4.prompt import MANTIS_SYSTEM
    from m4.tokenizer import TOKENIZER_CORPUS, Tokenizer

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    marks = "".join(f"(image {i}: <Image>x</Image>)" for i in range(1, 4))
    corpus = TOKENIZER_CORPUS + [MANTIS_SYSTEM, "system user assistant"] + [marks + " Compare them."] * 50
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=600, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens(LLAMA3_SPECIALS)
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))])
    path = tmp_path_factory.mktemp("llama3-tok")
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
        "chat_template": LLAMA3_CHAT}))
    return Tokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(path)


def mantis_user_text(question: str, n_images: int) -> str:
    """Mantis's rule: missing placeholders go in front of the text, then each is written
    "(image k: <Image><image></Image>)", k counting from 1."""
    runs = (IMAGE * (n_images - question.count(IMAGE)) + question).split(IMAGE)
    return runs[0] + "".join(f"(image {k}: <Image>{IMAGE}</Image>){r}" for k, r in enumerate(runs[1:], 1))


@pytest.mark.parametrize("question, n", [
    ("What is in the picture?", 1),
    ("Compare them.", 2),
    ("(a) or (b): which one changed?", 3),
    (f"What is in {IMAGE}?", 1),
    (f"What changed between {IMAGE} and {IMAGE}?", 2),
    (f"{IMAGE}{IMAGE}{IMAGE}Which two are the same?", 3),
    ("Hello", 0),
])
def test_mantis_prompt_ids_equal_its_processor_in_the_chat_template(llama3_tokenizer, question, n):
    from m4.prompt import MANTIS_SYSTEM, build

    tokenizer, hf = llama3_tokenizer
    image_id = tokenizer.token_id(IMAGE)
    p = build(TEMPLATES["llama3"], tokenizer, image_id, 1, question, n)
    user = mantis_user_text(question, n)
    messages = [{"role": "system", "content": MANTIS_SYSTEM}, {"role": "user", "content": user}]
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert p.text == text
    assert p.ids == hf(text, add_special_tokens=False)["input_ids"]
    # Mantis's own path: its Llama-3 conversation string, BOS from the tokenizer
    conv = "".join(f"<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>"
                   for role, content in (("system", MANTIS_SYSTEM), ("user", user)))
    assert p.ids == hf(conv + "<|start_header_id|>assistant<|end_header_id|>\n\n")["input_ids"]
    assert p.ids.count(image_id) == n


def test_mantis_build_text_and_joined_runs(llama3_tokenizer):
    from m4.prompt import MANTIS_SYSTEM, build

    tokenizer, _ = llama3_tokenizer
    image_id = tokenizer.token_id(IMAGE)
    p = build(TEMPLATES["llama3"], tokenizer, image_id, 3, "Compare them.", 2)
    assert p.text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" + MANTIS_SYSTEM
                      + "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
                      "(image 1: <Image><image></Image>)(image 2: <Image><image></Image>)Compare them."
                      "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert p.ids.count(image_id) == 6
    # the join between two denotations tokenizes differently on its own, so runs must join first
    assert tokenizer.encode("</Image>)(image 2") != tokenizer.encode("</Image>)") + tokenizer.encode("(image 2")


def test_mantis_video_frames_and_views_are_numbered_in_front(checkpoints):
    model = m4.load(checkpoints["gqa-tied-last-full"], template="llama3")
    t = TEMPLATES["llama3"]
    frames = random_images(3)
    p = model.prompt("What happens?", video=frames)
    marks = "".join(f"(image {k}: <Image><image></Image>)" for k in (1, 2, 3))
    assert p.text == t.header + marks + "What happens?" + t.footer
    assert model.prompt("What happens?", views=frames).ids == model.prompt("What happens?", images=frames).ids == p.ids
