"""Chat templates rendered by tsqp against transformers' apply_chat_template on the same tokenizer."""
from __future__ import annotations

import json

import pytest

from tsqp.trusted.tokenizer import Tokenizer
from tsqp.trusted.chat import ChatTemplate, ChatTemplateError

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke about 東京 🙂 and {{ braces }} {% raw %}."}],
    [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "a"},
     {"role": "assistant", "content": '{"x": 1}'}, {"role": "user", "content": "b\n\nc  d"}],
]


@pytest.fixture(scope="module")
def smol(smollm2_gguf):
    from transformers import AutoTokenizer

    tok = Tokenizer(smollm2_gguf)
    ref = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    return tok, ChatTemplate.from_source(smollm2_gguf, tok), ref


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["user", "system", "multi-turn", "json"])
def test_prompt_ids_equal_transformers(smol, messages):
    tok, chat, ref = smol
    want = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert chat.prompt_ids(tok, messages) == want
    assert chat.render(messages) == ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert chat.render(messages, add_generation_prompt=False) == \
        ref.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)


def test_gguf_stop_ids_are_eos_and_end_of_turn(smol):
    """SmolLM2's GGUF names <|im_end|> (2) as eos, and its template ends every turn with it."""
    tok, chat, _ = smol
    assert chat.stop_ids == [2] and tok.special_tokens()[2] == "<|im_end|>"
    assert chat.render(CONVERSATIONS[2], add_generation_prompt=False).count("<|im_end|>") == 4


def test_end_of_turn_found_in_the_template(smol):
    """A template ending assistant turns with another special token adds that token to the stop ids."""
    tok, _, _ = smol
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                "{% if m['role'] == 'assistant' %}<|endoftext|>{% else %}<|im_end|>{% endif %}\n{% endfor %}")
    chat = ChatTemplate(template, {"eos_token": "<|im_end|>"}, [], tok)
    assert chat.stop_ids == [2, 0]


def test_template_features_render_as_transformers(smol):
    """tojson without HTML escaping, namespace, loop controls, named special tokens, strftime_now and
    raise_exception, through both renderers."""
    tok, _, ref = smol
    template = ("{{ bos_token }}{% set ns = namespace(n=0) %}{% for m in messages %}{% if m['role'] == 'skip' %}"
                "{% continue %}{% endif %}{% set ns.n = ns.n + 1 %}{{ m | tojson }}\n{% endfor %}"
                "{{ ns.n }}{{ eos_token }}{% if strftime_now('%Y') | length != 4 %}{{ raise_exception('bad') }}"
                "{% endif %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    messages = [{"role": "user", "content": "<a & b> \"q\" é"}, {"role": "skip", "content": "x"},
                {"role": "assistant", "content": "ok"}]
    chat = ChatTemplate(template, {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}, [], tok)
    got = chat.render(messages)
    assert got == ref.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                          tokenize=False)
    assert '"<a & b> \\"q\\" é"' in got and "\n2<|im_end|>" in got
    with pytest.raises(ChatTemplateError, match="only user turns"):
        ChatTemplate("{{ raise_exception('only user turns') }}", {}, [], tok).render(messages)


def test_sandbox_refuses_python_internals(smol):
    tok, _, _ = smol
    for template in ("{{ messages.__class__.__mro__ }}", "{% set ns = namespace() %}{% set ns._x = 1 %}"):
        with pytest.raises(ChatTemplateError):
            ChatTemplate(template, {}, [], tok).render([{"role": "user", "content": "hi"}])


def test_model_dir_sources(smollm2_gguf, tmp_path, smol):
    """tokenizer_config.json's template (a string or a named list), chat_template.jinja taking precedence,
    and generation_config.json's eos ids in the stop ids."""
    tok, gguf_chat, _ = smol
    tok.tok.save(str(tmp_path / "tokenizer.json"))
    config = {"eos_token": {"content": "<|im_end|>", "special": True}, "bos_token": "<|im_start|>",
              "chat_template": [{"name": "tool_use", "template": "nope"},
                                {"name": "default", "template": gguf_chat.text}]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    chat = ChatTemplate.from_source(tmp_path)
    assert chat.prompt_ids(tok, CONVERSATIONS[1]) == gguf_chat.prompt_ids(tok, CONVERSATIONS[1])
    assert chat.stop_ids == [0, 2]
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    assert ChatTemplate.from_source(tmp_path).render(CONVERSATIONS[0]) == CONVERSATIONS[0][0]["content"] + "!"
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    with pytest.raises(ChatTemplateError, match="no chat template"):
        ChatTemplate.from_source(tmp_path)
