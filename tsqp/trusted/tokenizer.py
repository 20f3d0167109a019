"""Text <-> token ids on the trusted side: a Hugging Face tokenizer.json through the `tokenizers` package,
and a streaming decoder that turns ids into text as they are generated."""
from __future__ import annotations

from pathlib import Path


class TokenizerError(ValueError):
    """No usable tokenizer; the message says where tsqp looked."""


def find(path: str | Path) -> Path:
    """A tokenizer.json file, or a model directory that holds one."""
    p = Path(path)
    file = p / "tokenizer.json" if p.is_dir() else p
    if not file.is_file():
        raise TokenizerError(f"{file}: not found (expected a tokenizer.json or a model directory holding one)")
    return file


class Tokenizer:
    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as HFTokenizer

        self.path = find(path)
        try:
            self.tok = HFTokenizer.from_file(str(self.path))
        except Exception as e:  # the Rust side raises a bare Exception for malformed files
            raise TokenizerError(f"{self.path}: cannot load ({e})") from None

    def encode(self, text: str) -> list[int]:
        """With the tokenizer's own special tokens (e.g. Llama's BOS), as the model was trained."""
        return self.tok.encode(text, add_special_tokens=True).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def stream(self) -> "StreamDecoder":
        return StreamDecoder(self)


class StreamDecoder:
    """Feed ids one at a time, get the new text. Each step decodes only a short window (from the start of the
    previous piece), so the cost stays flat; a piece ending in U+FFFD (a multi-byte character cut between
    tokens) is held back until the next token completes it. The pieces join to decode(all ids)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0      # window start: the start of the last piece
        self.read_offset = 0        # ids before this have been emitted

    def step(self, token: int) -> str:
        self.ids.append(token)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        text = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix):]
        return ""

    def flush(self) -> str:
        """What is still held back (an incomplete character at the very end)."""
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        text = self.tokenizer.decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix):]
