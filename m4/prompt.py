"""Interleaved prompts: where images go in the text, and the exact ids the decoder sees.

A prompt is a list of parts: runs of text and image slots. The text between two image
slots is tokenized as one run, as a tokenizer given the whole prompt string splits it only at
its special tokens, and each image slot becomes `tokens_per_image` copies of the image token.
The live video context appends the same parts one frame at a time.

Placement (as LLaVA-Interleave was trained): where the text has `<image>` placeholders the
images go there, one each (interleaved); where it has none, they go in front of the text,
each followed by the template's separator (a newline for LLaVA-Interleave, nothing for Mantis).
Video frames and views of a scene always go in front.

Mantis writes every image as "(image N: <Image><image></Image>)", N counting from 1 over the
whole conversation, inside the Llama-3 chat format with the system turn its code trains and
answers with (TIGER-AI-Lab/Mantis: mantis/models/conversation.py conv_llama_3, used by
mantis/train/data.py and mantis/models/mllava/utils.py chat_mllava); images without
placeholders are prepended to the user's text with no separator, as its training data
loader does (mantis/train/data.py) before MLlavaProcessor numbers them.
"""

from __future__ import annotations

from dataclasses import dataclass

from m4.errors import M4Error
from m4.tokenizer import Tokenizer

IMAGE = "<image>"
SYSTEM = "You are a helpful assistant."
# Mantis-8B-*-llama3's system turn, verbatim: its fine-tuning put it before every sample
MANTIS_SYSTEM = "You are a pirate chatbot who always responds in pirate speak!"


@dataclass(frozen=True)
class Template:
    name: str
    header: str  # everything before the user's content
    footer: str  # end of the user turn and start of the assistant's
    inline: str  # how an image is written where the text has a placeholder; {i} counts from 1
    stop: tuple[str, ...]  # tokens that end the answer
    turn: str  # after an answer's stop token: the start of the next user turn (multi-turn training data)
    sep: str = "\n"  # after each image placed in front of the text

    @property
    def front(self) -> str:
        return self.inline + self.sep

    def stop_ids(self, tokenizer: Tokenizer) -> set[int]:
        """The ids of the stop tokens that this tokenizer has."""
        return {i for s in self.stop if (i := tokenizer.token_id(s)) is not None}


TEMPLATES = {
    # LLaVA-NeXT's conv_qwen_1_5 (ChatML), which llava-interleave-qwen uses
    "qwen_1_5": Template(
        name="qwen_1_5",
        header=f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n",
        footer="<|im_end|>\n<|im_start|>assistant\n",
        inline=IMAGE,
        stop=("<|im_end|>", "<|endoftext|>"),
        turn="\n<|im_start|>user\n"),
    # Mantis (Llama-3): images are denoted "(image N: <Image><image></Image>)"; the tokenizer's
    # own BOS, which Mantis's processor adds, is written out here
    "llama3": Template(
        name="llama3",
        header=("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" + MANTIS_SYSTEM
                + "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"),
        footer="<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        inline="(image {i}: <Image><image></Image>)",
        stop=("<|eot_id|>", "<|end_of_text|>"),
        turn="<|start_header_id|>user<|end_header_id|>\n\n",
        sep=""),
}


def detect_template(tokenizer: Tokenizer) -> Template:
    """The template a checkpoint was trained with, told by its tokenizer's special tokens."""
    if tokenizer.token_id("<|im_start|>") is not None:
        return TEMPLATES["qwen_1_5"]
    if tokenizer.token_id("<|start_header_id|>") is not None:
        return TEMPLATES["llama3"]
    raise M4Error("cannot tell the chat template from the tokenizer (no <|im_start|> or "
                  "<|start_header_id|>); pass template= one of " + ", ".join(TEMPLATES))


Part = str | int  # a text run, or the index of an image


@dataclass
class Prompt:
    text: str  # the decoder's text, one `<image>` per image
    ids: list[int]  # the decoder's ids, each image expanded to its tokens
    parts: list[list[int] | int]  # token ids of each text run, or an image index
    n_images: int


def split_images(text: str, first: int) -> list[Part]:
    """Text with `<image>` marks -> text runs and image indices, numbered from `first`."""
    runs = text.split(IMAGE)
    parts: list[Part] = [runs[0]]
    for k, run in enumerate(runs[1:]):
        parts += [first + k, run]
    return [p for p in parts if p != ""]


def image_parts(t: Template, index: int, front: bool) -> list[Part]:
    return split_images((t.front if front else t.inline).format(i=index + 1), index)


def question_parts(t: Template, question: str, n_images: int, first: int = 0) -> list[Part]:
    """The user's text with its images: interleaved at the placeholders, else in front."""
    marks = question.count(IMAGE)
    if marks and marks != n_images:
        raise M4Error(f"the prompt has {marks} <image> placeholders but {n_images} images were given")
    if not marks:
        front = [p for i in range(first, first + n_images) for p in image_parts(t, i, front=True)]
        return front + [question]
    runs = question.split(IMAGE)
    parts: list[Part] = [runs[0]]
    for k, run in enumerate(runs[1:]):
        parts += image_parts(t, first + k, front=False) + [run]
    return [p for p in parts if p != ""]


def expand_placeholders(question: str, counts: list[int]) -> str:
    """Let placeholder i stand for counts[i] consecutive images (anyres: a base view and
    its tiles, as many as the image's aspect gives)."""
    runs = question.split(IMAGE)
    if len(runs) == 1:
        return question
    if len(runs) - 1 != len(counts):
        raise M4Error(f"the prompt has {len(runs) - 1} <image> placeholders but {len(counts)} images were given")
    return runs[0] + "".join(IMAGE * n + run for n, run in zip(counts, runs[1:]))


def build(t: Template, tokenizer: Tokenizer, image_token_id: int, tokens_per_image: int,
          question: str, n_images: int) -> Prompt:
    """A whole single-turn prompt."""
    return build_chat(t, tokenizer, image_token_id, tokens_per_image, [(question, n_images, None)])


SYSTEMS = {"qwen_1_5": SYSTEM, "llama3": MANTIS_SYSTEM}  # the system text each template's header holds


def build_chat(t: Template, tokenizer: Tokenizer, image_token_id: int, tokens_per_image: int,
               turns: list[tuple[str, int, str | None]], system: str | None = None) -> Prompt:
    """A conversation of (question, its image count, answer) turns, the last one's answer None
    (the one to generate), rendered as training renders multi-turn records: each earlier answer
    followed by the stop token and the template's next-turn text. `system` replaces the
    template's system text. Images are numbered over the whole conversation."""
    header = t.header if system is None else t.header.replace(SYSTEMS[t.name], system)
    parts: list[Part] = [header]
    first = 0
    for k, (question, n, answer) in enumerate(turns):
        parts += ([t.turn] if k else []) + question_parts(t, question, n, first) + [t.footer]
        if answer is not None:
            parts.append(answer + t.stop[0])
        first += n
    return tokenize(parts, tokenizer, image_token_id, tokens_per_image)


def tokenize(parts: list[Part], tokenizer: Tokenizer, image_token_id: int, tokens_per_image: int) -> Prompt:
    # adjacent text runs join first: "</Image>)" + "(image 2: ..." tokenizes as one string does
    joined: list[Part] = []
    for p in parts:
        if isinstance(p, str) and joined and isinstance(joined[-1], str):
            joined[-1] += p
        else:
            joined.append(p)
    text: list[str] = []
    ids: list[int] = []
    out: list[list[int] | int] = []
    for p in joined:
        if isinstance(p, int):
            text.append(IMAGE)
            ids += [image_token_id] * tokens_per_image
            out.append(p)
        else:
            text.append(p)
            run = tokenizer.encode(p)
            ids += run
            out.append(run)
    return Prompt(text="".join(text), ids=ids, parts=out, n_images=sum(isinstance(p, int) for p in parts))
