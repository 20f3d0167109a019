"""The tokenizer tsqp rebuilds from a GGUF's metadata against transformers' tokenizer from the same file."""
from __future__ import annotations

import gguf
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tsqp.gguf_checkpoint import field, open_reader
from tsqp.trusted.tokenizer import Tokenizer, TokenizerError

TEXTS = ["Hello world", " leading space and trailing ", "The quick brown fox jumps over the lazy dog.",
         "Line one\nline two\n\n\tindented  double  spaces   ", "I'm sure they'll say we've DONE it, y'know?",
         "naïve café — 東京タワー 🙂👍🏽 Ελληνικά русский عربى", "12345 + 678 = 7023; pi ~ 3.14159",
         "def f(x):\n    return x ** 2  # square\n", "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
         "<|endoftext|><repo_name>tsqp<file_sep>", "<|im_end", "   ", "", "\u200b\ufeff zero width", "a" * 300]


@pytest.fixture(scope="module")
def pair(smollm2_gguf):
    from transformers import AutoTokenizer

    return Tokenizer(smollm2_gguf), AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


@pytest.mark.parametrize("text", TEXTS)
def test_ids_and_decode_equal_transformers(pair, text):
    ours, ref = pair
    ids = ours.encode(text)
    assert ids == ref(text).input_ids
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    if "<|" not in text and "<repo" not in text:
        assert ours.decode(ids) == text            # byte-level BPE loses nothing


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=60))
def test_arbitrary_unicode_equals_transformers(pair, text):
    ours, ref = pair
    ids = ours.encode(text)
    assert ids == ref(text).input_ids
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)


def test_special_tokens_are_single_ids(pair):
    ours, _ = pair
    assert ours.special_tokens()[2] == "<|im_end|>" and ours.token_id("<|im_start|>") == 1
    assert ours.encode("<|im_start|>assistant<|im_end|>")[0] == 1
    assert ours.decode([1, 2]) == ""                # skipped as special


def test_variant_pre_tokenizer_bos_and_user_defined_tokens(smollm2_gguf, tmp_path):
    """The same vocabulary re-declared as a Llama-3-style tokenizer (pre 'llama-bpe', add_bos_token) with a
    user-defined (non-special) token: tsqp follows transformers on the wiring this file does not exercise."""
    from transformers import AutoTokenizer

    reader = open_reader(smollm2_gguf)
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    types[12] = gguf.TokenType.USER_DEFINED          # <jupyter_text>: kept whole, but not special
    w = gguf.GGUFWriter(str(tmp_path / "variant.gguf"), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(field(reader, "tokenizer.ggml.merges"))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours = Tokenizer(tmp_path / "variant.gguf")
    ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file="variant.gguf")
    for text in TEXTS + ["<jupyter_text>print(1)", "x   \n\n  y's 1234567"]:
        ids = ours.encode(text)
        assert ids == ref(text).input_ids, text
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
    assert ours.encode("hi")[0] == 1 and "<jupyter_text>" in ours.decode(ours.encode("<jupyter_text>"))
    # the Llama-3 split is in effect: it cuts runs of whitespace differently from GPT-2's
    assert ours.encode("x   \n\n  y's")[1:] != Tokenizer(smollm2_gguf).encode("x   \n\n  y's")


def test_sentencepiece_gguf_is_refused(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "spm.gguf"), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(TokenizerError, match="tokenizer.ggml.model is 'llama'"):
        Tokenizer(tmp_path / "spm.gguf")
