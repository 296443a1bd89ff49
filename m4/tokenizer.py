"""The checkpoint's tokenizer (tokenizer.json, through the `tokenizers` library, no torch),
and the builder of small byte-level BPE tokenizers for checkpoints m4 makes itself.

Small tokenizers mirror Qwen2's: the same pre-tokenizer regex, byte-level BPE, and the
special tokens of a chat style (ChatML as Qwen2 has them, or Llama 3's) plus `<image>`
appended after the learned vocabulary.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers.decoders import DecodeStream

from m4.errors import M4Error

QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
               r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{% for message in messages %}{% if loop.first %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class ChatStyle:
    specials: tuple[str, ...]  # appended after the learned vocabulary, in this order
    bos: str | None
    eos: str
    pad: str
    template: str  # the chat template transformers applies


CHAT_STYLES = {
    "chatml": ChatStyle(("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"), None, "<|im_end|>",
                        "<|endoftext|>", CHATML_TEMPLATE),
    "llama3": ChatStyle(("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                         "<|eot_id|>", "<image>"), "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>",
                        LLAMA3_TEMPLATE),
}


class Tokenizer:
    def __init__(self, tok: HFTokenizer):
        self.tok = tok

    @property
    def style(self) -> ChatStyle:
        """The chat style whose special tokens this tokenizer has (ChatML if none)."""
        return next((s for s in CHAT_STYLES.values() if self.token_id(s.eos) is not None), CHAT_STYLES["chatml"])

    @classmethod
    def from_dir(cls, path: Path) -> Tokenizer:
        f = Path(path) / "tokenizer.json"
        if not f.is_file():
            raise M4Error(f"no tokenizer.json in {path}")
        return cls(HFTokenizer.from_file(str(f)))

    def encode(self, text: str) -> list[int]:
        """Ids of `text`; special tokens written in it (`<|im_start|>`) become their ids."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def token_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def special_ids(self) -> list[int]:
        """The ids of its special tokens (control tokens such as <|im_end|> and <image>)."""
        return [i for i, t in self.tok.get_added_tokens_decoder().items() if t.special]

    def pieces(self) -> Callable[[int], str]:
        """Incremental detokenizer for ids given one at a time (an answer decoded in a batch,
        where no iterator of its ids exists): each id gives the text it completes, "" until
        that text is whole UTF-8."""
        decoder, known = DecodeStream(skip_special_tokens=False), len(self)

        def feed(token: int) -> str:
            if token >= known:  # embedding rows past the tokenizer (padding) have no text
                return ""
            return decoder.step(self.tok, token) or ""
        return feed

    def detokenize(self, ids: Iterable[int]) -> Iterator[str]:
        """Text pieces of ids as they come (an answer streamed token by token)."""
        feed = self.pieces()
        for token in ids:
            if piece := feed(token):
                yield piece

    def __len__(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def save(self, path: Path) -> None:
        """tokenizer.json plus the config transformers' AutoTokenizer needs to load it."""
        path = Path(path)
        self.tok.save(str(path / "tokenizer.json"))
        s = self.style
        (path / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": s.bos, "eos_token": s.eos, "pad_token": s.pad,
            "model_max_length": 32768, "chat_template": s.template,
        }, indent=2))


def build_tokenizer(texts: Iterable[str], vocab_size: int, style: str = "chatml") -> Tokenizer:
    """Train a byte-level BPE on `texts` with at most `vocab_size` ids, the chat style's
    special tokens last."""
    specials = list(CHAT_STYLES[style].specials)
    tok = HFTokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens(specials)
    return Tokenizer(tok)


# Text for the small tokenizers of seeded random checkpoints (tests, the random demo):
# the words of the M4 scenarios, enough of them to fill a 512-id vocabulary.
TOKENIZER_CORPUS = [
    f"The {colour} {shape} at the {place} moves {way}. How many {shape}s are there? Which one changed?"
    for colour in ("red", "green", "blue", "yellow", "purple", "orange", "white", "black", "pink", "brown")
    for shape in ("square", "circle", "triangle", "star", "diamond", "cross")
    for way in ("left", "right", "up", "down")
    for place in ("top left", "top right", "bottom left", "bottom right", "centre")
] + ["What is happening in the video? Describe the scene, the first frame and the last frame. "
     "Answer with a single word or number: yes, no, zero, one, two, three, four, five, 0 1 2 3 4 5 6 7 8 9. "
     "Seen from the front view, the side view and the top view of one scene; a small object in a tile "
     "of a large image. Spot the difference between the two images: which shape moved or changed colour?"]
