"""Prompts as a checkpoint frames them: bos as its tokenizer config says, and chat messages rendered with its
Jinja ``chat_template`` the way transformers renders one (a sandboxed environment with ``trim_blocks`` and
``lstrip_blocks``, ``raise_exception``, ``strftime_now`` and a ``tojson`` that keeps non-ASCII text), so a
chat model sees the same text here as under ``tokenizer.apply_chat_template``."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

from monet_jax.data.tokenizer import Tokenizer


def prompt_ids(tok: Tokenizer, text: str) -> list[int]:
    """A plain prompt: bos first when the tokenizer adds it (``add_bos_token``), then the text."""
    return [tok.bos_id] * bool(getattr(tok, "add_bos", True)) + [int(t) for t in tok.encode(text)]


@lru_cache(maxsize=8)
def _compiled(template: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"chat_template: {e.message} (line {e.lineno})") from None


def render_chat(template: str, messages: list[dict], special_tokens: dict | None = None, *,
                add_generation_prompt: bool = True, **variables) -> str:
    """The text of ``messages`` (``[{"role": ..., "content": ...}]``) under a Jinja chat template, with the
    tokenizer's special tokens (``bos_token``, ``eos_token``, ...) and ``add_generation_prompt`` in scope."""
    import jinja2

    try:
        return _compiled(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                          **(special_tokens or {}), **variables)
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"chat_template: {e}") from None


def chat_messages(prompt: str, system: str | None = None) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def chat_ids(tok: Tokenizer, messages: list[dict], *, add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a rendered chat: special tokens the template writes are their ids; bos is added (when the
    tokenizer adds it) only if the template did not already write it."""
    template = getattr(tok, "chat_template", None)
    if not template:
        raise ValueError(f"tokenizer {tok.describe()} has no chat_template (in tokenizer_config.json or "
                         "chat_template.jinja): not a chat model")
    text = render_chat(template, messages, getattr(tok, "special_tokens", {}),
                       add_generation_prompt=add_generation_prompt)
    ids = tok.encode_with_specials(text)
    if getattr(tok, "add_bos", True) and ids[:1] != [tok.bos_id]:
        ids = [tok.bos_id, *ids]
    return ids
