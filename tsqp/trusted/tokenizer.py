"""Text <-> token ids on the trusted side: a Hugging Face tokenizer.json (or the tokenizer a GGUF file
describes, rebuilt by trusted/gguf_tokenizer.py) through the `tokenizers` package, and a streaming decoder
that turns ids into text as they are generated."""
from __future__ import annotations

from pathlib import Path


class TokenizerError(ValueError):
    """No usable tokenizer; the message says where tsqp looked."""


def find(path: str | Path) -> Path:
    """A tokenizer.json file, a .gguf file, or a model directory that holds a tokenizer.json."""
    p = Path(path)
    file = p / "tokenizer.json" if p.is_dir() else p
    if not file.is_file():
        raise TokenizerError(f"{file}: not found (expected a tokenizer.json, a .gguf file, "
                             f"or a model directory holding a tokenizer.json)")
    return file


class Tokenizer:
    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as HFTokenizer

        self.path = find(path)
        if self.path.suffix.lower() == ".gguf":
            from ..config import ConfigError
            from .gguf_tokenizer import build_tokenizer
            try:
                self.tok = build_tokenizer(self.path)
            except ConfigError as e:
                raise TokenizerError(str(e)) from None
            return
        try:
            self.tok = HFTokenizer.from_file(str(self.path))
        except Exception as e:  # the Rust side raises a bare Exception for malformed files
            raise TokenizerError(f"{self.path}: cannot load ({e})") from None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """By default with the tokenizer's own special tokens (e.g. Llama's BOS), as the model was trained;
        a rendered chat template already holds them (add_special_tokens=False)."""
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def token_id(self, token: str) -> int | None:
        """The id of one token (e.g. '<|im_end|>'), or None if the vocabulary has no such token."""
        return self.tok.token_to_id(token)

    def special_tokens(self) -> dict[int, str]:
        """id -> text of the added tokens marked special (control tokens such as BOS, EOS, end-of-turn)."""
        return {i: t.content for i, t in self.tok.get_added_tokens_decoder().items() if t.special}

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
