"""A word-level tokenizer for the demo world's tiny vocabulary.

open_clip's text tower pools the features at the end-of-text token by taking
the argmax of the token ids, so the end-of-text token must have the largest
id in the vocabulary; padding is 0.
"""

from __future__ import annotations

import re

import torch

PAD, SOT, UNK = "<pad>", "<sot>", "<unk>"
EOT = "<eot>"
WORD = re.compile(r"[a-z]+")


class WordTokenizer:
    def __init__(self, words: list[str], context_length: int) -> None:
        self.vocabulary = [PAD, SOT, UNK, *sorted(set(words)), EOT]
        self.index = {word: i for i, word in enumerate(self.vocabulary)}
        self.context_length = context_length

    @property
    def vocab_size(self) -> int:
        return len(self.vocabulary)

    def encode(self, text: str) -> list[int]:
        ids = [self.index.get(word, self.index[UNK]) for word in WORD.findall(text.lower())]
        ids = [self.index[SOT], *ids[: self.context_length - 2], self.index[EOT]]
        return ids + [0] * (self.context_length - len(ids))

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        return torch.tensor([self.encode(text) for text in texts], dtype=torch.long)


CONTEXT_LENGTH = 20  # = text_cfg.context_length of the TM-Demo-* configs

# Frozen, because a word's id is its place in this list: changing it silently changes what
# the shipped text towers read. A test checks that every caption and prompt word is here.
DEMO_WORDS = (
    "a", "background", "black", "blue", "checkered", "circle", "cross", "cyan", "dark", "diamond",
    "dotted", "drawing", "green", "grey", "hatched", "hexagon", "is", "large", "noisy", "of", "on",
    "orange", "pattern", "photo", "pink", "purple", "red", "ring", "ringed", "sand", "shape", "sketch",
    "small", "solid", "something", "square", "star", "striped", "that", "triangle", "white", "with",
    "yellow",
)


def demo_tokenizer() -> WordTokenizer:
    return WordTokenizer(list(DEMO_WORDS), CONTEXT_LENGTH)
