"""Training records -> token ids, labels and pixels; the sampler and the collator.

Records (M4-Instruct or Mantis-Instruct: their format, reading and checking) are m4.records.

Sequences are built with m4.prompt, part by part as `Model.prompt` builds them, so the
prompt of a training sample is token for token what the model sees at inference. Each
sample is placed one of the two ways LLaVA-Interleave mixes (chosen per sample and epoch):
interleaved at its placeholders, or all images in front of the text. Video frames always go
in front. Labels are the answers and their stop token; everything else is IGNORE.

What can be checked up front is checked when the file is read (m4.records.load_records:
`m4 train` stops at the first bad record, or with --skip-bad leaves them out); what shows only
when decoding (a corrupt image, a sequence over --max-len) when the sample is built, and such
samples are skipped and counted with their first reasons.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from m4.errors import M4Error
from m4.media import ImageProcessing, load_image, preprocess, sample_uniform, tile
from m4.prompt import IMAGE, Template, expand_placeholders, question_parts, tokenize
from m4.records import as_list, in_front, turns
from m4.tokenizer import Tokenizer

IGNORE = -100  # label of tokens that are not trained on (torch's cross-entropy default)


@dataclass
class Example:
    ids: list[int]  # one image token per image: the collator expands each to tokens_per_image
    labels: list[int]
    pixels: np.ndarray | None  # (images, 3, S, S)


@dataclass
class Skip:
    kind: str
    reason: str


# -- records -> examples --------------------------------------------------------------------

class InstructData(torch.utils.data.Dataset):
    """Indexed by (record, epoch): the placement is drawn from both, so that every epoch
    shows a record in a fresh placement while any rank, worker or resumed run draws the same."""

    def __init__(self, records: list[dict], root: Path, tokenizer: Tokenizer, template: Template,
                 image_token_id: int, processing: ImageProcessing, frames: int = 8, in_front_prob: float = 0.5,
                 max_len: int = 4096, tokens_per_image: int = 1, seed: int = 0):
        self.records, self.root, self.tokenizer, self.template = records, Path(root), tokenizer, template
        self.image_token_id, self.processing, self.frames = image_token_id, processing, frames
        self.in_front_prob, self.max_len, self.tokens_per_image, self.seed = in_front_prob, max_len, tokens_per_image, seed
        stop = tokenizer.token_id(template.stop[0])
        if stop is None:
            raise M4Error(f"the tokenizer has no {template.stop[0]!r}, the chat template's stop token")
        self.stop = stop

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, int]) -> Example | Skip:
        i, epoch = key
        rec = self.records[i]
        front = random.Random(f"{self.seed}/{epoch}/{i}").random() < self.in_front_prob
        try:
            x = self.example(rec, front)
        except M4Error as e:
            return Skip("unreadable", f"record {rec.get('id', i)}: {e}")
        length = len(x.ids) + (0 if x.pixels is None else len(x.pixels)) * (self.tokens_per_image - 1)
        if length > self.max_len:
            return Skip("too long", f"record {rec.get('id', i)}: {length} tokens > --max-len {self.max_len}")
        return x

    def example(self, rec: dict, front: bool) -> Example:
        pairs = turns(rec["conversations"])
        questions, counts, pictures = self.visuals(rec, [q for q, _ in pairs], front)
        t, ids, labels, first = self.template, [], [], 0
        for k, ((_, answer), q, n) in enumerate(zip(pairs, questions, counts)):
            parts = [t.header if k == 0 else t.turn] + question_parts(t, q, n, first) + [t.footer]
            prompt = tokenize(parts, self.tokenizer, self.image_token_id, 1).ids
            reply = self.tokenizer.encode(answer) + [self.stop]
            ids += prompt + reply
            labels += [IGNORE] * len(prompt) + reply
            first += n
        pixels = preprocess(pictures, self.processing) if pictures else None
        return Example(ids, labels, pixels)

    def visuals(self, rec: dict, questions: list[str], front: bool):
        """Each turn's question as placed, how many images it takes, and all the images."""
        if "video" in rec:
            frames = [f.image for f in sample_uniform(str(self.root / rec["video"]), self.frames)]
            return [in_front(q) for q in questions], [len(frames)] + [0] * (len(questions) - 1), frames
        images = [load_image(self.root / p) for p in as_list(rec.get("image"))]
        groups = [tile(img, self.processing.image_size) if rec.get("patches") else [img] for img in images]
        if not any(IMAGE in q for q in questions):  # no placeholders: all in front of the first question
            n = sum(len(g) for g in groups)
            return questions, [n] + [0] * (len(questions) - 1), [p for g in groups for p in g]
        placed, counts, k = [], [], 0
        for q in questions:
            sizes = [len(g) for g in groups[k:k + q.count(IMAGE)]]
            k += len(sizes)
            q = expand_placeholders(q, sizes)
            placed.append(in_front(q) if front else q)
            counts.append(sum(sizes))
        return placed, counts, [p for g in groups for p in g]


# -- batches --------------------------------------------------------------------------------

class Batches:
    """Endless micro-batches of (record, epoch) keys for one rank: each epoch a seeded
    permutation, padded to a multiple of the world size and dealt out rank by rank (as
    DistributedSampler does), so that the union of the ranks' k-th batches is the k-th batch
    of one process with world x the batch size. Given `lengths`, each run of GROUP global
    batches is sorted by length first (LLaVA's group_by_length): batches of like lengths
    waste less on padding. `start` skips batches already trained on."""

    GROUP = 16

    def __init__(self, n: int, batch: int, rank: int = 0, world: int = 1, seed: int = 0, start: int = 0,
                 lengths: list[int] | None = None):
        self.n, self.batch, self.rank, self.world, self.seed, self.start = n, batch, rank, world, seed, start
        self.lengths = lengths

    def per_epoch(self) -> int:
        return math.ceil(math.ceil(self.n / self.world) / self.batch)

    def order(self, epoch: int) -> list[int]:
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        order += order[:(-len(order)) % self.world]
        if lengths := self.lengths:
            span = self.batch * self.world * self.GROUP
            order = [i for s in range(0, len(order), span)
                     for i in sorted(order[s:s + span], key=lambda i: -lengths[i])]
        return order

    def __iter__(self):
        epoch, skip = divmod(self.start, self.per_epoch())
        while True:
            mine = self.order(epoch)[self.rank::self.world]
            for i in range(skip * self.batch, len(mine), self.batch):
                yield [(j, epoch) for j in mine[i:i + self.batch]]
            epoch, skip = epoch + 1, 0


def approx_length(rec: dict, tokens_per_image: int, frames: int) -> int:
    """Tokens of a record, roughly (text at 4 characters a token; anyres as 5 images), for
    grouping by length without decoding anything."""
    text = sum(len(t["value"]) for t in rec["conversations"]) // 4
    images = frames if "video" in rec else len(as_list(rec.get("image"))) * (5 if rec.get("patches") else 1)
    return text + images * tokens_per_image


class Collate:
    """Examples -> padded tensors, each image token expanded to tokens_per_image copies."""

    def __init__(self, image_token_id: int, tokens_per_image: int, pad_id: int):
        self.image_token_id, self.tokens_per_image, self.pad_id = image_token_id, tokens_per_image, pad_id

    def __call__(self, items: list[Example | Skip]) -> dict:
        good = [x for x in items if isinstance(x, Example)]
        # a batch whose records were all skipped still makes a (zero-loss) step: FSDP ranks
        # must run the same forwards
        rows = [self.expand(x) for x in good] or [(np.array([self.pad_id]), np.array([IGNORE]))]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), width), self.pad_id)
        labels = torch.full((len(rows), width), IGNORE)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (i, lab) in enumerate(rows):  # right padding: causal attention never sees it
            ids[r, :len(i)], labels[r, :len(i)], mask[r, :len(i)] = torch.from_numpy(i), torch.from_numpy(lab), 1
        pixels = [x.pixels for x in good if x.pixels is not None]
        return {"input_ids": ids, "labels": labels, "attention_mask": mask,
                "pixel_values": torch.from_numpy(np.concatenate(pixels)) if pixels else None,
                "skipped": [(x.kind, x.reason) for x in items if isinstance(x, Skip)]}

    def expand(self, x: Example) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(x.ids)
        repeats = np.where(ids == self.image_token_id, self.tokens_per_image, 1)
        return np.repeat(ids, repeats), np.repeat(np.asarray(x.labels), repeats)
