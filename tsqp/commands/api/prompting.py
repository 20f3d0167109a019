"""What a request asks the model to continue: its prompt's token ids (through the chat template for chat
requests) and how many tokens it may add, refused with a named field when they cannot fit the context."""
from __future__ import annotations

from ...config import ModelConfig
from ...trusted.chat import ChatTemplate, ChatTemplateError
from ...trusted.tokenizer import Tokenizer
from . import schema
from .limits import Prompts
from .schema import APIError


class Prompting:
    def __init__(self, cfg: ModelConfig, tokenizer: Tokenizer, template: ChatTemplate | None,
                 template_error: str | None, default_max_tokens: int):
        self.cfg, self.tokenizer, self.template, self.template_error = cfg, tokenizer, template, template_error
        self.default_max_tokens = default_max_tokens
        self.prompts = Prompts(tokenizer, cfg.max_position_embeddings)

    def prompt_ids(self, req: schema.Request) -> tuple[list[int], list[int] | None]:
        """(prompt ids, the ids that end the generation: the template's end of turn, or None for the model's
        eos). Runs on a thread: templates and long prompts take a while."""
        if req.kind == "chat":
            if self.template is None:
                raise APIError(400, f"this model has no chat template ({self.template_error}); use /v1/completions",
                               param="messages")
            try:
                text = self.template.render(req.messages)
            except ChatTemplateError as e:
                raise APIError(400, str(e), param="messages") from None
            self.prompts.check(text, "messages")        # before tokenizing: a prompt too long costs nothing
            ids = self.tokenizer.encode(text, add_special_tokens=False)     # the template writes any BOS
            stop_ids, param = self.template.stop_ids, "messages"
        elif isinstance(req.prompt, str):
            self.prompts.check(req.prompt, "prompt")
            ids, stop_ids, param = self.tokenizer.encode(req.prompt), None, "prompt"
        else:
            ids, stop_ids, param = list(req.prompt), None, "prompt"
        if param == "prompt":
            outside = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
            if outside:
                raise APIError(400, f"token id {outside[0]} is outside the vocabulary 0..{self.cfg.vocab_size - 1}",
                               param=param)
        if not ids:
            raise APIError(400, "the prompt is empty", param=param)
        return ids, stop_ids

    def max_new_tokens(self, req: schema.Request, prompt_tokens: int) -> int:
        """Refuse a prompt (plus max_tokens) beyond the model's context; fill in max_tokens when not given."""
        context, asked = self.cfg.max_position_embeddings, req.max_tokens
        if prompt_tokens >= context:
            raise APIError(400, f"This model's maximum context length is {context} tokens; the prompt holds "
                                f"{prompt_tokens}", param="messages" if req.kind == "chat" else "prompt",
                           code="context_length_exceeded")
        if asked is None:
            return min(self.default_max_tokens, context - prompt_tokens)
        if prompt_tokens + asked > context:
            raise APIError(400, f"This model's maximum context length is {context} tokens; the prompt holds "
                                f"{prompt_tokens} and max_tokens asks for {asked} more", param="max_tokens",
                           code="context_length_exceeded")
        return asked
