"""Text ⇄ token ids with the model folder's ``tokenizer.json``, and chat templates.

Chat templates are Jinja, as Hugging Face defines them; they are rendered in
jinja2's immutable sandbox because a template is data shipped with a model, not
code we trust.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.sandbox
from tokenizers import Tokenizer as _HFTokenizer

from agent.engine.model_folder import ModelFolder
from edge_contract.errors import InvalidRequestError, ModelConfigError, ModelFileError


class Tokenizer:
    """Encodes prompts, decodes ids and renders chat messages for one model folder."""

    def __init__(self, folder: ModelFolder) -> None:
        try:
            self._tok = _HFTokenizer.from_file(str(folder.tokenizer_path))
        except Exception as exc:  # tokenizers raises a bare Exception on a bad file
            raise ModelFileError(folder.tokenizer_path, f"not a valid tokenizer: {exc}") from exc
        config = folder.tokenizer_config or {}
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self._template: jinja2.Template | None = None
        if folder.chat_template is not None:
            self._template = _compile_template(folder.chat_template, folder)

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer knows (may be below the model's vocab)."""
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def has_chat_template(self) -> bool:
        """Whether ``messages`` can be rendered for this model."""
        return self._template is not None

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids for ``text``; special tokens per the tokenizer's post-processor."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            # Python's json accepts lone surrogates ("\ud800"); tokenizers then fails with a bare
            # TypeError, which would count against the model rather than the request.
            raise InvalidRequestError(
                f"the text is not valid Unicode (a lone surrogate at character {exc.start})"
            ) from None
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Text for ``ids``; incomplete UTF-8 sequences come out as U+FFFD."""
        return str(self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def render_chat(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True) -> str:
        """The prompt text for chat ``messages`` (``[{role, content}, …]``)."""
        if self._template is None:
            raise InvalidRequestError("this model has no chat template; send a plain prompt instead")
        try:
            return self._template.render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except jinja2.TemplateError as exc:
            raise InvalidRequestError(f"chat template failed on these messages: {exc}") from exc

    def encode_chat(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        """Token ids for chat ``messages``; the template itself places bos/eos."""
        return self.encode(self.render_chat(messages), add_special_tokens=False)


def _token_text(value: object) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _compile_template(source: str, folder: ModelFolder) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ModelConfigError(f"{folder.path}: chat template does not compile: {exc}") from exc
