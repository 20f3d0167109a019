"""Chat templates: a model's Jinja template turned into prompt text and ids, rendered as transformers'
apply_chat_template renders it (sandboxed Jinja with trim_blocks and lstrip_blocks, `raise_exception`,
`strftime_now`, a `tojson` that does not escape HTML; the named special tokens as variables), and the ids
that end the assistant's turn.

Sources: a .gguf file (`tokenizer.chat_template` and the `tokenizer.ggml.*_token_id` metadata), or a
Hugging Face model directory (`chat_template.jinja` or tokenizer_config.json's `chat_template`, its named
special tokens, and generation_config.json's eos ids).
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

PROBE = "\x00tsqp-probe\x00"   # text no real message holds: finds where the template ends an assistant turn


class ChatTemplateError(ValueError):
    """No usable chat template; the message says where tsqp looked."""


def _environment():
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes <, >, & for HTML, which would change a prompt
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    class Namespace(jinja2.utils.Namespace):
        """A namespace that refuses underscore names, so a template cannot reach Python internals through it."""

        def __init__(*args, **kwargs):     # Jinja's signature trick: `namespace(self=...)` still works
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace.check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace.check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set namespace attribute {name!r}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["namespace"] = Namespace
    return env


def _token_text(value) -> str | None:
    """tokenizer_config.json writes a special token as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _eos_list(value) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else [int(v) for v in value]


class ChatTemplate:
    def __init__(self, template: str, special_tokens: dict[str, str], eos_ids: list[int], tokenizer,
                 source: str = "<string>"):
        """template: the Jinja source; special_tokens: {'bos_token': '<s>', ...} (template variables);
        eos_ids: the checkpoint's own eos ids; tokenizer: a tsqp Tokenizer of the same model, used to find
        the end-of-turn token."""
        import jinja2

        self.source, self.text = source, template
        self.special_tokens = dict(special_tokens)
        try:
            self.template = _environment().from_string(template)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"{source}: chat template does not parse ({e})") from None
        ids = list(eos_ids)
        eos = self.special_tokens.get("eos_token")
        if eos is not None and tokenizer.token_id(eos) is not None:
            ids.append(tokenizer.token_id(eos))
        end = self._end_of_turn(tokenizer)
        if end is not None:
            ids.append(end)
        self.stop_ids = list(dict.fromkeys(ids))   # in order, once each

    @classmethod
    def from_source(cls, path: str | Path, tokenizer=None) -> "ChatTemplate":
        """path: a .gguf file or a model directory; tokenizer: a tsqp Tokenizer of the same model (loaded from
        path when None)."""
        from .tokenizer import Tokenizer

        p = Path(path)
        tokenizer = tokenizer if tokenizer is not None else Tokenizer(p)
        if p.suffix.lower() == ".gguf":
            return cls._from_gguf(p, tokenizer)
        if p.is_dir():
            return cls._from_dir(p, tokenizer)
        raise ChatTemplateError(f"{p}: not found (expected a .gguf file or a model directory)")

    @classmethod
    def _from_gguf(cls, path: Path, tokenizer) -> "ChatTemplate":
        from ..gguf_checkpoint import field, open_reader
        from .gguf_tokenizer import special_tokens

        reader = open_reader(path)
        template = field(reader, "tokenizer.chat_template", None)
        if template is None:
            raise ChatTemplateError(f"{path}: no tokenizer.chat_template in the metadata")
        eos = [field(reader, f"tokenizer.ggml.{k}_token_id", None) for k in ("eos", "eot", "eom")]
        return cls(template, special_tokens(path).as_dict(), [e for e in eos if e is not None], tokenizer,
                   str(path))

    @classmethod
    def _from_dir(cls, path: Path, tokenizer) -> "ChatTemplate":
        def read_json(name: str) -> dict:
            file = path / name
            if not file.is_file():
                return {}
            try:
                return json.loads(file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ChatTemplateError(f"{file}: not valid JSON ({e})") from None

        config = read_json("tokenizer_config.json")
        jinja_file = path / "chat_template.jinja"
        if jinja_file.is_file():              # transformers >= 4.50 saves the template beside the config
            template = jinja_file.read_text(encoding="utf-8")
        else:
            template = config.get("chat_template")
            if isinstance(template, list):    # named templates: [{"name": "default", "template": ...}, ...]
                template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if not isinstance(template, str):
            raise ChatTemplateError(f"{path}: no chat template (looked for chat_template.jinja and "
                                    f"tokenizer_config.json's 'chat_template')")
        named = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        eos = _eos_list(read_json("generation_config.json").get("eos_token_id"))
        return cls(template, {k: v for k, v in named.items() if v is not None}, eos, tokenizer, str(path))

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text. messages: [{'role': 'system'|'user'|'assistant', 'content': str}, ...]."""
        import jinja2

        plain = [{k: v for k, v in dict(m).items() if v is not None} for m in messages]  # as transformers drops None
        try:
            return self.template.render(messages=plain, tools=None, documents=None,
                                        add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"{self.source}: chat template refused the messages ({e})") from None

    def prompt_ids(self, tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """The rendered prompt's ids; the template writes any BOS itself, so none is added."""
        return tokenizer.encode(self.render(messages, add_generation_prompt), add_special_tokens=False)

    def _end_of_turn(self, tokenizer) -> int | None:
        """The special token the template writes right after an assistant message's text (ChatML's
        <|im_end|>, Llama 3's <|eot_id|>), or None where it writes none."""
        try:
            text = self.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": PROBE}],
                               add_generation_prompt=False)
        except ChatTemplateError:
            return None
        if PROBE not in text:
            return None
        after = text[text.index(PROBE) + len(PROBE):]
        for i, token in sorted(tokenizer.special_tokens().items(), key=lambda kv: -len(kv[1])):
            if after.startswith(token):
                return i
        return None
