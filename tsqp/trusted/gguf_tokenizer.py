"""A `tokenizers.Tokenizer` rebuilt from a GGUF file's tokenizer metadata (a GGUF has no tokenizer.json).

Only llama.cpp's `gpt2` tokenizer model (byte-level BPE: Llama 3, SmolLM, Qwen, ...) is supported. It is
built the way transformers' GGUF loader builds it (integrations/gguf/gguf_tokenizer_mapping.py), so both give
the same ids: the vocabulary in GPT-2's byte alphabet, the file's merges, control tokens (type 3) added as
special tokens and user-defined ones (type 4) as plain added tokens, the pre-tokenizer's split regex chosen by
`tokenizer.ggml.pre`, and BOS/EOS added only where the file's add_bos_token/add_eos_token say so.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError
from ..gguf_checkpoint import field, open_reader

CONTROL, USER_DEFINED = 3, 4    # llama.cpp's token types

# Split regexes by tokenizer.ggml.pre, for the pre-tokenizers whose merges were learned on other splits than
# GPT-2's (the ByteLevel default); as transformers' GGUF_PRE_TOKENIZER_SPLITS.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_SPLITS = {**dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx"), _LLAMA3_SPLIT),
              **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT)}


@functools.lru_cache(maxsize=1)
def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map (bytes_to_unicode)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


@dataclass(frozen=True)
class SpecialTokens:
    """The named special tokens of a GGUF (strings, or None where the file names none)."""
    bos_token: str | None
    eos_token: str | None
    unk_token: str | None
    pad_token: str | None

    def as_dict(self) -> dict[str, str]:
        return {k: v for k, v in vars(self).items() if v is not None}


def special_tokens(path: str | Path) -> SpecialTokens:
    reader = open_reader(path)
    tokens = field(reader, "tokenizer.ggml.tokens")
    named = {}
    for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        i = field(reader, f"tokenizer.ggml.{key}_token_id", None)
        named[f"{name}_token"] = tokens[i] if i is not None and 0 <= i < len(tokens) else None
    return SpecialTokens(**named)


def build_tokenizer(path: str | Path):
    """tokenizers.Tokenizer for the GGUF at `path`; ConfigError naming the file where it cannot be built."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    reader = open_reader(path)
    src = reader.data.filename
    kind = field(reader, "tokenizer.ggml.model", None)
    if kind != "gpt2":
        raise ConfigError(f"{src}: tokenizer.ggml.model is '{kind}'; only 'gpt2' (byte-level BPE) is supported")
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    merges = field(reader, "tokenizer.ggml.merges", None)
    if merges is None:
        raise ConfigError(f"{src}: no tokenizer.ggml.merges; a byte-level BPE tokenizer needs them")

    spell = byte_alphabet()
    alphabet = set(spell.values())
    # a token written in plain text (e.g. with a real space) is respelled in the byte alphabet, as BPE sees it
    vocab = {(t if set(t) <= alphabet else "".join(spell[b] for b in t.encode("utf-8"))): i
             for i, t in enumerate(tokens)}
    tok = Tokenizer(BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], dropout=None,
                        continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    split = PRE_SPLITS.get(field(reader, "tokenizer.ggml.pre", None))
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()

    named = special_tokens(path)
    # a "control" token outside the byte alphabet is a llama.cpp mislabel: adding it would grow the vocabulary
    control = [t for t, ty in zip(tokens, types) if ty == CONTROL and set(t) <= alphabet]
    control += [t for t in named.as_dict().values() if t not in control]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    user = [t for t, ty in zip(tokens, types) if ty == USER_DEFINED and t in vocab]
    if user:
        tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])

    add_bos = field(reader, "tokenizer.ggml.add_bos_token", False) and named.bos_token is not None
    add_eos = field(reader, "tokenizer.ggml.add_eos_token", False) and named.eos_token is not None
    bos, eos = named.bos_token, named.eos_token
    single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
    specials = [(bos, tok.token_to_id(bos))] if add_bos else []
    specials += [(eos, tok.token_to_id(eos))] if add_eos else []
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
    return tok
