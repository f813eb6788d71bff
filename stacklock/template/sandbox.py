"""Chat-template rendering identical to Hugging Face transformers, inside a sandbox with limits.

Matched: transformers 5.23.0, ``src/transformers/utils/chat_template_utils.py``
(``_cached_compile_jinja_template`` and ``render_jinja_template``) and ``tokenization_utils_base.py``
(``apply_chat_template``), rendered with jinja2 3.1.6. What is reproduced:

* The environment: ``ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
  extensions=[<generation tag>, jinja2.ext.loopcontrols])``; ``{% generation %}`` is a no-op block like
  transformers' ``AssistantTracker`` when no mask is asked for.
* The globals and filters: ``tojson`` is ``json.dumps(x, ensure_ascii=False, indent=None,
  separators=None, sort_keys=False)``; ``raise_exception(msg)``; ``strftime_now(fmt)`` (here on the pinned
  ``now``, not the wall clock, so that renders reproduce); ``dict`` limited to calling and ``fromkeys``;
  ``namespace`` refusing underscore-prefixed attributes.
* The inputs: keys whose value is ``None`` are dropped from every message; everything the template sees is
  rebuilt from plain JSON types; ``reasoning_content`` is filled from ``thinking``/``reasoning`` and
  ``thinking`` from ``reasoning_content``; the template gets ``messages``, ``tools`` (``None`` when not
  given), ``documents`` (``None`` when not given), ``add_generation_prompt``, ``bos_token`` and
  ``eos_token`` only when they are not ``None`` (transformers passes ``special_tokens_map``, which leaves
  out unset tokens), then ``extra_context``, which overrides the tokens. An empty conversation is refused,
  as in transformers.
* Undefined variables use Jinja's default ``Undefined``: they render as the empty string.

Deliberate differences, all of them for untrusted templates only: reading an unsafe attribute
(``''.__class__``) fails at once instead of rendering an empty string; and runaway templates stop with a
:class:`~stacklock.errors.TemplateError` where transformers would hang or exhaust memory.

Limits are enforced in-process and cooperatively, which keeps the core pure (no threads, signals or child
processes): every ``for`` loop iterates through a guard that checks the deadline, every call (macros,
``loop()`` of recursive loops, methods, globals) checks the deadline and the size of its arguments and result,
``+``, ``*``, ``**`` and ``%`` check the size of their result before computing it, string-growing filters and
``str`` methods are checked before they run, ``~`` and namespace assignments are checked, and the output is
streamed against a cap. Python's ``RecursionError`` from runaway macros or recursive loops is translated.

Feature names reported by :func:`template_features` (found on the Jinja AST, or by regular expressions when
the text does not parse):

=======================  ===========================================================================
``bos-token``            reads ``bos_token``
``eos-token``            reads ``eos_token``
``generation-tag``       uses ``{% generation %}`` (transformers' assistant-mask block)
``keys-method``          calls ``.keys()``
``loopcontrols``         uses ``{% break %}`` or ``{% continue %}``
``macro``                defines a ``{% macro %}``
``namespace``            calls ``namespace()``
``raise-exception``      calls ``raise_exception``
``recursive-loop``       has a ``{% for ... recursive %}`` loop
``reject-in``            uses ``reject("in", ...)`` / ``select("in", ...)`` (the ``in`` test)
``reverse-slice``        slices with ``[::-1]``
``role-alternation``     checks that user and assistant alternate (``loop.index0 % 2``)
``startswith``           calls ``.startswith()`` or ``.endswith()``
``strftime-now``         calls ``strftime_now``
``system-role-rejected`` raises an exception whose message mentions the system role
``tojson``               uses the ``tojson`` filter
``tools``                reads ``tools``
``documents``            reads ``documents``
=======================  ===========================================================================
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import json
import math
import re
import string
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import jinja2
import jinja2.exceptions
import jinja2.ext
import jinja2.nodes
import jinja2.runtime
import jinja2.sandbox
import jinja2.utils
from jinja2 import nodes
from jinja2.visitor import NodeTransformer

from stacklock.errors import RenderLimitError, TemplateError
from stacklock.template.worker import run_bounded

if TYPE_CHECKING:
    from types import CodeType, TracebackType

    from jinja2.parser import Parser

__all__ = [
    "FEATURES",
    "RenderLimits",
    "compile_check",
    "render_chat_template",
    "template_dialect",
    "template_features",
]

FEATURES: tuple[str, ...] = (
    "bos-token",
    "documents",
    "eos-token",
    "generation-tag",
    "keys-method",
    "loopcontrols",
    "macro",
    "namespace",
    "raise-exception",
    "recursive-loop",
    "reject-in",
    "reverse-slice",
    "role-alternation",
    "startswith",
    "strftime-now",
    "system-role-rejected",
    "tojson",
    "tools",
)
"""Every name :func:`template_features` can report, sorted."""

_TEMPLATE_FILENAME = "<template>"
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_RAW_TEMPLATE_DEFAULT_ORIGIN = "chat template"
_RESERVED_CONTEXT = frozenset({"messages", "tools", "documents", "add_generation_prompt"})
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


@dataclass(frozen=True)
class RenderLimits:
    """Bounds on one render. The defaults are far above any real chat template and far below harm."""

    max_seconds: float = 2.0
    """Wall-clock budget, checked at every loop iteration, call and output chunk."""
    max_output_chars: int = 1_000_000
    """Length of the rendered prompt; a million characters is far beyond any context window."""
    max_value_size: int = 1_000_000
    """Length of any string, list or tuple the template builds, so that no value outgrows the output cap."""
    max_int_bits: int = 10_000
    """Size of any integer the template computes; ``10 ** 10 ** 10`` would otherwise take forever."""
    max_tojson_indent: int = 1_000
    """``tojson(indent=...)`` multiplies the output by nesting depth, so absurd indents are refused."""


class _Limit(Exception):  # noqa: N818 - An internal signal, translated into TemplateError at the edge.
    """A limit was hit; ``kind`` picks the message."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


class _RaisedByTemplate(jinja2.TemplateError):
    """What ``raise_exception`` raises; a ``jinja2.TemplateError`` like transformers' own."""


class _State:
    """The per-render budget shared by every hook."""

    def __init__(self, limits: RenderLimits) -> None:
        self.limits = limits
        self.deadline = time.monotonic() + limits.max_seconds

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise _Limit("time", "")

    def check_size(self, size: int, what: str) -> None:
        if size > self.limits.max_value_size:
            raise _Limit("size", f"{what} of {size} characters or items")

    def check_value(self, value: object) -> None:
        if isinstance(value, (str, bytes, list, tuple, dict)):
            self.check_size(len(value), f"a {type(value).__name__}")
        elif isinstance(value, int) and not isinstance(value, bool):
            self.check_bits(value.bit_length())

    def check_bits(self, bits: int) -> None:
        if bits > self.limits.max_int_bits:
            raise _Limit("int", f"an integer of {bits} bits")

    def check_width(self, width: object) -> None:
        """A width or count argument that would build a value larger than the size limit."""
        if isinstance(width, int) and not isinstance(width, bool) and abs(width) > self.limits.max_value_size:
            raise _Limit("size", f"a width or count argument of {width}")


def _length(value: object) -> int:
    return len(value) if isinstance(value, (str, bytes, list, tuple)) else len(str(value))


class _GuardedIterable:
    """What every ``for`` loop iterates: the original iterable, with the deadline checked at each item."""

    def __init__(self, iterable: Iterable[Any], state: _State) -> None:
        self._iterable = iterable
        self._state = state

    def __iter__(self) -> Iterator[Any]:
        tick = self._state.tick
        for item in self._iterable:
            tick()
            yield item

    def __len__(self) -> int:
        # Delegating keeps ``loop.length`` from materialising the iterable; ``LoopContext`` catches TypeError.
        return len(self._iterable)  # type: ignore[arg-type]


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}`` as transformers' ``AssistantTracker`` parses it; renders its body unchanged."""

    tags = {"generation"}  # noqa: RUF012 - Jinja declares it a plain set.

    def parse(self, parser: Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_generation_support"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _generation_support(caller: Callable[[], str]) -> str:
        return caller()


class _Guards(jinja2.ext.Extension):
    """Runtime hooks reached from the rewritten AST; ``state`` is set once the environment is built."""

    state: _State

    def guard_iter(self, iterable: Any) -> _GuardedIterable:
        return _GuardedIterable(iterable, self.state)

    def guard_concat(self, *parts: Any) -> str:
        pieces = [str(part) for part in parts]
        self.state.check_size(sum(map(len, pieces)), "a '~' concatenation")
        return "".join(pieces)


class _Rewriter(NodeTransformer):
    """Routes ``for`` iterables and ``~`` through :class:`_Guards`, which the sandbox hooks cannot see."""

    def visit_For(self, node: nodes.For) -> nodes.Node:  # noqa: N802 - NodeVisitor naming.
        self.generic_visit(node)
        node.iter = _ext_call("guard_iter", [node.iter], node.lineno)  # type: ignore[list-item]
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:  # noqa: N802 - NodeVisitor naming.
        self.generic_visit(node)
        return _ext_call("guard_concat", list(node.nodes), node.lineno)


def _ext_call(method: str, args: list[nodes.Expr], lineno: int) -> nodes.Call:
    attr = nodes.ExtensionAttribute(_Guards.identifier, method, lineno=lineno)
    return nodes.Call(attr, args, [], None, None, lineno=lineno)


class _TemplateDict:
    """transformers' ``TemplateDict``: ``dict(...)`` and ``dict.fromkeys(...)`` without the type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


def _namespace_class(state: _State) -> type[jinja2.utils.Namespace]:
    class _TemplateNamespace(jinja2.utils.Namespace):
        """transformers' ``TemplateNamespace`` plus a size check: namespaces carry state across loops."""

        def __init__(*args: Any, **kwargs: Any) -> None:
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for name, value in attrs.items():
                _check_namespace_name(name)
                state.check_value(value)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            _check_namespace_name(name)
            state.check_value(value)
            jinja2.utils.Namespace.__setitem__(self, name, value)

    return _TemplateNamespace


def _check_namespace_name(name: object) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(
            f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}. "
            "Please rename the attribute."
        )


_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")
_DIGITS = re.compile(r"\d+")


class _Environment(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """transformers' environment with the limit hooks; one is built for every render."""

    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def __init__(self, state: _State) -> None:
        super().__init__(
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=[_GenerationTag, jinja2.ext.loopcontrols, _Guards],
        )
        self.state = state
        guards = self.extensions[_Guards.identifier]
        assert isinstance(guards, _Guards)
        guards.state = state

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = super()._parse(source, name, filename)
        rewritten = _Rewriter().visit(tree)
        assert isinstance(rewritten, nodes.Template)
        return rewritten

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        # Jinja returns an Undefined that renders as '' until used further; failing at once names the attempt.
        raise jinja2.exceptions.SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} is unsafe"
        )

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any) -> Any:
        state = self.state
        state.tick()
        if operator == "*":
            _check_repeat(state, left, right)
            _check_repeat(state, right, left)
            if _is_int(left) and _is_int(right):
                state.check_bits(left.bit_length() + right.bit_length())
        elif operator == "+":
            if isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
                state.check_size(len(left) + len(right), "a '+' result")
        elif operator == "**":
            if _is_int(left) and _is_int(right) and abs(left) > 1 and right > 0:
                state.check_bits(math.ceil(right * math.log2(abs(left))))
        elif operator == "%" and isinstance(left, str):
            _check_percent_format(state, left, right)
        result = super().call_binop(context, operator, left, right)
        state.check_value(result)
        return result

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        state, fmt = self.state, value.__self__

        def checked(*args: Any, **kwargs: Any) -> str:
            # Jinja sandboxes str.format at attribute access, so its widths are checked here, not in call().
            _check_format_string(state, fmt, (*args, *kwargs.values()))
            return wrapped(*args, **kwargs)

        return checked

    def call(self, context: jinja2.runtime.Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        state = self.state
        state.tick()
        for value in (*args, *kwargs.values()):
            state.check_value(value)
        _check_method(state, obj, args, kwargs)
        result = super().call(context, obj, *args, **kwargs)
        state.check_value(result)
        return result


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_repeat(state: _State, seq: object, count: object) -> None:
    if isinstance(seq, (str, bytes, list, tuple)) and _is_int(count):
        assert isinstance(count, int)
        state.check_size(len(seq) * max(count, 0), "a '*' repetition")


def _check_percent_format(state: _State, fmt: str, args: object) -> None:
    values = args if isinstance(args, tuple) else (args,)
    for match in _PERCENT_SPEC.finditer(fmt):
        for group in match.groups():
            if group == "*":
                for value in values:
                    state.check_width(value)
            elif group is not None:
                state.check_width(int(group))


def _check_format_string(state: _State, fmt: str, args: Iterable[Any]) -> None:
    for _, _, spec, _ in string.Formatter().parse(fmt):
        for digits in _DIGITS.findall(spec or ""):
            state.check_width(int(digits))
    for value in args:
        state.check_width(value)
        # A nested replacement field takes its width from an argument as text: '{0:{1}}'.format('a', '9' * 9).
        if isinstance(value, str) and 0 < len(value) <= 32 and value.strip().lstrip("+-").isdigit():
            state.check_width(int(value))


def _check_method(state: _State, obj: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    """Pre-checks ``str`` methods that can build a value far larger than their inputs."""
    owner = getattr(obj, "__self__", None)
    if not isinstance(owner, str):
        return
    name = getattr(obj, "__name__", "")
    values = (*args, *kwargs.values())
    if name in {"center", "ljust", "rjust", "zfill", "expandtabs"}:
        for value in values:
            state.check_width(value)
        if name == "expandtabs" and values and _is_int(values[0]):
            state.check_size(len(owner) * max(values[0], 1), "an expandtabs result")
    elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        _check_replace(state, owner, args[0], args[1])
    elif name == "join":
        items = list(args[0]) if args else []
        state.check_size(sum(_length(item) for item in items) + len(owner) * len(items), "a join result")
    elif name == "translate" and args and isinstance(args[0], Mapping):
        longest = max((_length(v) for v in args[0].values() if v is not None), default=1)
        state.check_size(len(owner) * longest, "a translate result")


def _check_replace(state: _State, text: str, old: str, new: str) -> None:
    occurrences = len(text) + 1 if not old else text.count(old)
    state.check_size(len(text) + occurrences * max(len(new) - len(old), 0), "a replace result")


def _wrap_filter(state: _State, name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    pass_arg = getattr(func, "jinja_pass_arg", None)

    def guarded(*args: Any, **kwargs: Any) -> Any:
        state.tick()
        # Filters that take a context (or eval context) receive it first; the value comes next.
        offset = 1 if pass_arg is not None else 0
        extra = (*args[offset + 1 :], *kwargs.values())
        for value in extra:
            state.check_width(value)
        if len(args) > offset:
            _precheck_filter(state, name, args[offset], args[offset + 1 :], kwargs)
        result = func(*args, **kwargs)
        state.check_value(result)
        return result

    guarded.__name__ = getattr(func, "__name__", name)
    if pass_arg is not None:
        guarded.jinja_pass_arg = pass_arg  # type: ignore[attr-defined]
    return guarded


def _precheck_filter(
    state: _State, name: str, value: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> None:
    text = value if isinstance(value, str) else None
    if name == "replace" and text is not None and len(args) >= 2:
        _check_replace(state, text, str(args[0]), str(args[1]))
    elif name == "join" and isinstance(value, Iterable) and not isinstance(value, str):
        items = list(value)
        separator = str(args[0]) if args else str(kwargs.get("d", ""))
        state.check_size(sum(_length(item) for item in items) + len(separator) * len(items), "a join result")
    elif name == "indent" and text is not None:
        width = args[0] if args else kwargs.get("width", 4)
        width_len = len(width) if isinstance(width, str) else width if _is_int(width) else 0
        state.check_size(len(text) + (text.count("\n") + 1) * width_len, "an indent result")
    elif name == "wordwrap" and text is not None:
        wrapstring = args[2] if len(args) > 2 else kwargs.get("wrapstring")
        if isinstance(wrapstring, str):
            state.check_size(len(text) * (len(wrapstring) + 1), "a wordwrap result")
    elif name == "format" and text is not None:
        _check_percent_format(state, text, tuple(args) or tuple(kwargs.values()))
    elif name == "tojson":
        indent = args[1] if len(args) > 1 else kwargs.get("indent")
        indent_size = len(indent) if isinstance(indent, str) else indent if isinstance(indent, int) else 0
        if indent_size > state.limits.max_tojson_indent:
            raise _Limit("size", f"a tojson indent of {indent_size}")


def _make_environment(state: _State, now: dt.datetime) -> _Environment:
    env = _Environment(state)

    def raise_exception(message: object) -> None:
        raise _RaisedByTemplate(str(message))

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: int | str | None = None,
        separators: tuple[str, str] | None = None,
        sort_keys: bool = False,
    ) -> str:
        # transformers replaces Jinja's HTML-escaping, key-sorting tojson with plain json.dumps.
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(format: str) -> str:  # noqa: A002 - transformers' parameter name, usable as a keyword.
        return now.strftime(format)

    lipsum = env.globals["lipsum"]

    def guarded_lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:  # noqa: A002
        # lipsum loops in Python per word, out of reach of the deadline, so its size is bounded up front.
        if _is_int(n) and _is_int(max):
            state.check_size(n * max * 12, "a lipsum result")
        return str(lipsum(n=n, html=html, min=min, max=max))  # type: ignore[operator]

    env.filters["tojson"] = tojson
    env.filters = {name: _wrap_filter(state, name, func) for name, func in env.filters.items()}
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _namespace_class(state)
    env.globals["lipsum"] = guarded_lipsum
    return env


def _label(origin: str) -> str:
    return "chat template" if origin == _RAW_TEMPLATE_DEFAULT_ORIGIN else f"chat template ({origin})"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _syntax_error(error: jinja2.TemplateSyntaxError, origin: str) -> TemplateError:
    return TemplateError(
        f"{_label(origin)} line {error.lineno}: {_one_line(error.message or 'syntax error')}",
        hint="fix the template syntax",
    )


def _parse_only_environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    """transformers' parser (same options and tags) without the guards: the template as written."""
    return jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )


_COMPILER_ERRORS = (SyntaxError, RecursionError, MemoryError, OverflowError)
"""What Python's own parser and compiler raise on templates nested past their limits (21 nested loops,
2,000 nested parentheses): Jinja compiles a template to Python source."""
_HARD_DEADLINE_SLACK_S = 1.0


_NESTING_WORDS = ("nest", "too many", "indentation")
"""Words of the compiler's messages about depth ('too many statically nested blocks', 'too many levels of
indentation', 'too many nested parentheses'); its other syntax errors are about the template's logic."""


def _compiler_error(error: BaseException, origin: str) -> TemplateError:
    what = _one_line(str(getattr(error, "msg", None) or type(error).__name__))
    if isinstance(error, SyntaxError) and not any(word in what.lower() for word in _NESTING_WORDS):
        # Jinja leaves a {% break %} or {% continue %} outside a loop to Python's compiler ('break' outside loop).
        return TemplateError(
            f"{_label(origin)}: does not compile ({what})",
            hint="{% break %} and {% continue %} belong inside a {% for %} loop; fix the template",
        )
    return TemplateError(
        f"{_label(origin)}: does not compile ({what}): it nests blocks or expressions too deeply",
        hint="simplify the template: fewer nested loops, conditions and brackets",
    )


def compile_check(text: str, origin: str) -> None:
    """Compile ``text`` as transformers would; a syntax error becomes a TemplateError naming the line."""
    try:
        _parse_only_environment().from_string(text)
    except jinja2.TemplateSyntaxError as error:
        raise _syntax_error(error, origin) from None
    except _COMPILER_ERRORS as error:
        raise _compiler_error(error, origin) from None


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool,
    bos_token: str | None,
    eos_token: str | None,
    now: dt.datetime,
    tools: Sequence[Mapping[str, Any]] | None = None,
    documents: Sequence[Mapping[str, Any]] | None = None,
    extra_context: Mapping[str, Any] | None = None,
    limits: RenderLimits = RenderLimits(),
    origin: str = _RAW_TEMPLATE_DEFAULT_ORIGIN,
) -> str:
    """Render ``template`` exactly as ``tokenizer.apply_chat_template(..., tokenize=False)`` would.

    Every failure is a one-line :class:`TemplateError`: a syntax error (with its line), ``raise_exception``,
    a sandbox escape, a runaway template (time, output, value size, integer size, recursion, memory) or any
    other rendering error. The render runs in a forked worker (:mod:`stacklock.template.worker`) that is killed
    at a hard deadline and has a memory cap, so even a single runaway filter call stops.
    """
    # Compiled here first, so that every forked render finds the code in the cache it inherits, and a template
    # that does not compile fails here, once, without a worker.
    _compile(template, origin)
    return run_bounded(
        lambda: _render_in_process(
            template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
            now=now,
            tools=tools,
            documents=documents,
            extra_context=extra_context,
            limits=limits,
            origin=origin,
        ),
        # The in-process checks normally stop a slow render first, with a message naming its loop's line.
        seconds=limits.max_seconds + _HARD_DEADLINE_SLACK_S,
        label=_label(origin),
    )


def _render_in_process(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool,
    bos_token: str | None,
    eos_token: str | None,
    now: dt.datetime,
    tools: Sequence[Mapping[str, Any]] | None,
    documents: Sequence[Mapping[str, Any]] | None,
    extra_context: Mapping[str, Any] | None,
    limits: RenderLimits,
    origin: str,
) -> str:
    label = _label(origin)
    if not messages:
        raise TemplateError(
            f"{label}: cannot apply a chat template to an empty conversation",
            hint="provide at least one message",
        )
    clash = sorted(_RESERVED_CONTEXT.intersection(extra_context or {}))
    if clash:
        raise TemplateError(
            f"{label}: extra context may not set {', '.join(map(repr, clash))}",
            hint="pass these as arguments of the render instead",
        )
    state = _State(limits)
    env = _make_environment(state, now)
    code = _compile(template, origin)
    compiled = env.template_class.from_code(env, code, env.make_globals(None), None)
    context = _context(messages, add_generation_prompt, bos_token, eos_token, tools, documents, extra_context)
    state.deadline = time.monotonic() + limits.max_seconds
    chunks: list[str] = []
    size = 0
    try:
        for chunk in compiled.generate(**context):
            size += len(chunk)
            if size > limits.max_output_chars:
                _output_exceeded()
            state.tick()
            chunks.append(chunk)
    except Exception as error:
        if _is_our_bug(error):
            raise
        raise _translate(error, label, limits) from None
    return "".join(chunks)


# What a template's own expressions raise on values it cannot handle ('a' - 1, x[9], 1 / 0, int('x')): the
# user's template is at fault. Jinja's errors and the sandbox's limits are the template's by construction.
_TEMPLATE_FAULTS = (
    jinja2.TemplateError,
    _Limit,
    TypeError,
    ValueError,
    LookupError,
    ArithmeticError,
    RecursionError,
    MemoryError,
)
_PACKAGE_DIR = str(Path(__file__).resolve().parent.parent)


def _is_our_bug(error: Exception) -> bool:
    """An error of another kind (NameError, AttributeError, AssertionError…) raised in stacklock's own guard
    code is a bug in stacklock, not in the user's template: it keeps its traceback instead of blaming them.
    """
    if isinstance(error, _TEMPLATE_FAULTS):
        return False
    traceback = error.__traceback__
    while traceback is not None and traceback.tb_next is not None:
        traceback = traceback.tb_next
    return traceback is not None and traceback.tb_frame.f_code.co_filename.startswith(_PACKAGE_DIR)


def _compile(template: str, origin: str) -> CodeType:
    """The template's code, or its compile error as a one-line TemplateError naming ``origin``."""
    outcome = _compile_outcome(template)
    if isinstance(outcome, jinja2.TemplateSyntaxError):
        raise _syntax_error(outcome, origin) from None
    if isinstance(outcome, BaseException):
        raise _compiler_error(outcome, origin) from None
    return outcome


@functools.lru_cache(maxsize=32)
def _compile_outcome(template: str) -> CodeType | BaseException:
    """The template compiled once per text, failures included: compiling costs far more than rendering (a
    pathological template can take seconds to fail), and the probes and smoke prompts render one template many
    times. The code does not depend on the limits or the clock, which the environment of each render carries."""
    env = _make_environment(_State(RenderLimits()), _EPOCH)
    try:
        code: CodeType = env.compile(template)
    except (jinja2.TemplateSyntaxError, *_COMPILER_ERRORS) as error:
        return error
    return code


def _output_exceeded() -> None:
    raise _Limit("output", "")


def _context(
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool,
    bos_token: str | None,
    eos_token: str | None,
    tools: Sequence[Mapping[str, Any]] | None,
    documents: Sequence[Mapping[str, Any]] | None,
    extra_context: Mapping[str, Any] | None,
) -> dict[str, Any]:
    chat = [{key: value for key, value in message.items() if value is not None} for message in messages]
    chat = _alias_reasoning_fields(_plain(chat))
    special = {
        name: token
        for name, token in (("bos_token", bos_token), ("eos_token", eos_token))
        if token is not None
    }
    kwargs = _plain({**special, **(extra_context or {})})
    return {
        "messages": chat,
        "tools": _plain(list(tools)) if tools is not None else None,
        "documents": _plain(list(documents)) if documents is not None else None,
        "add_generation_prompt": add_generation_prompt,
        **kwargs,
    }


def _alias_reasoning_fields(chat: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # transformers fills ``reasoning_content`` from older names, and ``thinking`` for templates that read it.
    aliased = []
    for message in chat:
        reasoning = next((message[key] for key in _REASONING_FIELDS if message.get(key) is not None), None)
        aliased.append(
            message
            if reasoning is None
            else {"thinking": reasoning, **message, "reasoning_content": reasoning}
        )
    return aliased


def _plain(value: Any) -> Any:
    """transformers' ``_plain_template_data``: the template sees plain JSON-like data, never rich objects."""
    if value is None or type(value) in {str, int, float, bool}:
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain(item) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: _plain(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _template_line(traceback: TracebackType | None) -> int | None:
    # Jinja rewrites tracebacks so that template frames carry the template's file name and line.
    line = None
    while traceback is not None:
        if traceback.tb_frame.f_code.co_filename == _TEMPLATE_FILENAME:
            line = traceback.tb_lineno
        traceback = traceback.tb_next
    return line


def _translate(error: Exception, label: str, limits: RenderLimits) -> TemplateError:
    line = _template_line(error.__traceback__)
    where = f"{label} line {line}" if line is not None else label
    if isinstance(error, _Limit):
        if error.kind == "time":
            return RenderLimitError(
                f"{label}: rendering exceeded {limits.max_seconds} s",
                hint="the template loops too long; check its loops or raise RenderLimits.max_seconds",
            )
        if error.kind == "output":
            return RenderLimitError(
                f"{label}: output exceeded {limits.max_output_chars} characters",
                hint="the template writes runaway output; check its loops or raise RenderLimits.max_output_chars",
            )
        if error.kind == "int":
            return TemplateError(
                f"{where}: {error.detail} exceeds the limit of {limits.max_int_bits} bits",
                hint="the template computes a runaway number; check its arithmetic",
            )
        return TemplateError(
            f"{where}: {error.detail} exceeds the limit of {limits.max_value_size}",
            hint="the template builds a runaway value; check its '*', '+', '~' and filters",
        )
    if isinstance(error, _RaisedByTemplate):
        return TemplateError(
            f"{label} raised: {_one_line(str(error))}",
            hint="the messages do not fit what this template accepts",
        )
    if isinstance(error, jinja2.exceptions.SecurityError):
        return TemplateError(
            f"{where} tried to escape the sandbox: {_one_line(str(error))}",
            hint="this template is unsafe; do not use it",
        )
    if isinstance(error, RecursionError):
        return TemplateError(
            f"{label}: recursion too deep",
            hint="the template recurses without end; check its macros and recursive loops",
        )
    if isinstance(error, MemoryError):
        # The worker's memory cap, a bound like the time limit: every probe's render would reach it again.
        return RenderLimitError(
            f"{label}: out of memory",
            hint="the template builds a runaway value; check its loops and arithmetic",
        )
    if isinstance(error, jinja2.TemplateSyntaxError):
        return TemplateError(
            f"{where}: {_one_line(error.message or 'syntax error')}", hint="fix the template syntax"
        )
    message = _one_line(str(error)) or type(error).__name__
    return TemplateError(
        f"{where} failed: {type(error).__name__}: {message}",
        hint="check the template against the messages it was given",
    )


# ---------------------------------------------------------------------------------------------------------
# Dialect and features: static looks at the text, no rendering.

_GO_ACTION = re.compile(
    r"\{\{-?\s*(?:\.[A-Za-z]|\$|range\s|if\s|else\b|end\b|with\s|define\s|template\s|block\s)"
)
_JINJA_STATEMENT = re.compile(r"\{%-?\s*\w+")


def template_dialect(text: str) -> Literal["jinja2", "go-template", "empty"]:
    """Ollama's Go ``text/template`` (``{{ .Messages }}``, ``{{ range }}``, ``{{ end }}``) or Jinja."""
    if not text.strip():
        return "empty"
    if _JINJA_STATEMENT.search(text):
        return "jinja2"
    if _GO_ACTION.search(text):
        return "go-template"
    return "jinja2"


_FEATURE_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("bos-token", re.compile(r"\bbos_token\b")),
    ("documents", re.compile(r"\bdocuments\b")),
    ("eos-token", re.compile(r"\beos_token\b")),
    ("generation-tag", re.compile(r"\{%-?\s*generation\b")),
    ("keys-method", re.compile(r"\.keys\(\s*\)")),
    ("loopcontrols", re.compile(r"\{%-?\s*(?:break|continue)\b")),
    ("macro", re.compile(r"\{%-?\s*macro\b")),
    ("namespace", re.compile(r"\bnamespace\(")),
    ("raise-exception", re.compile(r"\braise_exception\(")),
    ("recursive-loop", re.compile(r"\{%-?\s*for\b[^%]*\brecursive\b")),
    ("reject-in", re.compile(r"\b(?:reject|select)\(\s*['\"]in['\"]")),
    ("reverse-slice", re.compile(r"\[\s*:\s*:\s*-\s*1\s*\]")),
    ("role-alternation", re.compile(r"loop\.index0?\s*%\s*2")),
    ("startswith", re.compile(r"\.(?:startswith|endswith)\(")),
    ("strftime-now", re.compile(r"\bstrftime_now\(")),
    ("system-role-rejected", re.compile(r"raise_exception\([^)]*[Ss]ystem")),
    ("tojson", re.compile(r"\|\s*tojson\b")),
    ("tools", re.compile(r"\btools\b")),
)


def template_features(text: str) -> tuple[str, ...]:
    """The sorted :data:`FEATURES` that ``text`` uses, from its Jinja AST (by regex if it does not parse)."""
    try:
        tree = _parse_only_environment().parse(text)
    except (jinja2.TemplateSyntaxError, *_COMPILER_ERRORS):
        return tuple(sorted(name for name, pattern in _FEATURE_PATTERNS if pattern.search(text)))
    return tuple(sorted(_ast_features(tree)))


def _ast_features(tree: nodes.Template) -> set[str]:
    found: set[str] = set()
    names = {node.name for node in tree.find_all(nodes.Name)}
    found.update(feature for name, feature in _NAME_FEATURES.items() if name in names)
    if any(True for _ in tree.find_all((nodes.Break, nodes.Continue))):
        found.add("loopcontrols")
    if any(True for _ in tree.find_all(nodes.Macro)):
        found.add("macro")
    for block in tree.find_all(nodes.CallBlock):
        if (
            isinstance(block.call.node, nodes.ExtensionAttribute)
            and block.call.node.name == "_generation_support"
        ):
            found.add("generation-tag")
    if any(node.recursive for node in tree.find_all(nodes.For)):
        found.add("recursive-loop")
    for call in tree.find_all(nodes.Call):
        _call_features(call, found)
    for filt in tree.find_all(nodes.Filter):
        if filt.name == "tojson":
            found.add("tojson")
        if filt.name in {"reject", "select"} and filt.args and _const(filt.args[0]) == "in":
            found.add("reject-in")
    for sl in tree.find_all(nodes.Slice):
        if sl.start is None and sl.stop is None and _const(sl.step) == -1:
            found.add("reverse-slice")
    for mod in tree.find_all(nodes.Mod):
        if (
            _const(mod.right) == 2
            and isinstance(mod.left, nodes.Getattr)
            and mod.left.attr.startswith("index")
        ):
            found.add("role-alternation")
    return found


_NAME_FEATURES = {
    "bos_token": "bos-token",
    "eos_token": "eos-token",
    "tools": "tools",
    "documents": "documents",
    "namespace": "namespace",
    "raise_exception": "raise-exception",
    "strftime_now": "strftime-now",
}


def _call_features(call: nodes.Call, found: set[str]) -> None:
    if isinstance(call.node, nodes.Getattr):
        if call.node.attr == "keys":
            found.add("keys-method")
        elif call.node.attr in {"startswith", "endswith"}:
            found.add("startswith")
    elif isinstance(call.node, nodes.Name) and call.node.name == "raise_exception":
        text = " ".join(str(node.value) for node in call.find_all(nodes.Const) if isinstance(node.value, str))
        if "system" in text.lower():
            found.add("system-role-rejected")


def _const(node: nodes.Node | None) -> object:
    if isinstance(node, nodes.Const):
        return node.value
    if (
        isinstance(node, nodes.Neg)
        and isinstance(node.node, nodes.Const)
        and isinstance(node.node.value, int)
    ):
        return -node.node.value
    return None
