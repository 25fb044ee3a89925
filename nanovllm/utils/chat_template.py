"""Chat templates rendered with jinja2 as transformers renders them, without importing transformers.

A template sees what it sees under transformers' ``apply_chat_template``: ``messages`` (each message a
plain dict, keys whose value is None left out), ``tools``, ``documents``, ``add_generation_prompt``, the
tokenizer's special tokens (``bos_token``, ``eos_token``, ...) and any extra keyword. The environment is
the same: a sandbox whose values are immutable, ``trim_blocks`` and ``lstrip_blocks`` on, the
``loopcontrols`` extension (``break``/``continue``), the globals ``raise_exception``, ``strftime_now``,
``dict`` and ``namespace``, a ``tojson`` filter that leaves non-ASCII and HTML characters alone, and a
``{% generation %}`` block (transformers tracks the assistant's spans with it; here it only renders).
"""

import json
from datetime import datetime
from functools import lru_cache
from typing import Any


class _Dict:
    """``dict(...)`` and ``dict.fromkeys(...)`` for templates, without handing them the type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any) -> dict:
        return dict.fromkeys(*args)


@lru_cache(maxsize=8)
def compile_chat_template(source: str):
    """The compiled jinja2 template for ``source`` (cached: one model has one or two templates)."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    class Namespace(jinja2.utils.Namespace):
        """jinja2's namespace, refusing underscore names (a sandbox escape route)."""

        def __init__(*args: Any, **kwargs: Any):
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a chat template may not set {name!r} on a namespace")

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = _Dict()
    env.globals["namespace"] = Namespace
    return env.from_string(source)


def render_chat_template(
    source: str,
    messages: list[dict],
    *,
    add_generation_prompt: bool = False,
    tools: list[dict] | None = None,
    documents: list[dict] | None = None,
    **template_kwargs: Any,
) -> str:
    """``messages`` through the template ``source``; ``template_kwargs`` (special tokens, a template's
    own switches such as ``enable_thinking``) become template variables."""
    if not messages:
        raise ValueError("the conversation is empty; give at least one message")
    for m in messages:
        if not isinstance(m, dict):
            raise TypeError(f"each chat message must be a dict, got {m!r}")
    plain = [{k: v for k, v in m.items() if v is not None} for m in messages]
    return compile_chat_template(source).render(
        messages=plain,
        tools=tools,
        documents=documents,
        add_generation_prompt=add_generation_prompt,
        **template_kwargs,
    )
