"""Message templates: sandboxed Jinja2, compiled once and rendered per recipient.

Templates come from operators' campaign files, so they run in Jinja2's sandbox with strict
undefined variables: a typo in a column name fails loudly instead of sending a message with a
hole in it. Every failure, at compile or render time, is a `TemplateError` naming the template
and the line; no Jinja2 or Python exception leaves this module.
"""

from __future__ import annotations

import functools
import inspect
import re
import string
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from types import CodeType
from typing import Any, Final, Literal

from jinja2 import StrictUndefined, Template, TemplateSyntaxError, UndefinedError, meta, nodes
from jinja2.exceptions import SecurityError
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import generate_lorem_ipsum
from jinja2.visitor import NodeTransformer

from dispatcher.addresses import mask_address
from dispatcher.errors import Problem, TemplateError

TemplateKind = Literal["text", "html"]

# A message is short; a template that builds a huge string or number is a mistake (or an
# attempt to exhaust memory), not a message.
MAX_REPEATED_LENGTH: Final = 100_000
MAX_EXPONENT: Final = 10_000
# Bits of an integer a template computes: squaring a number in a loop doubles its size each round.
MAX_INTEGER_BITS: Final = 1_000_000
# Loop iterations plus calls in one render: nested loops or a branching macro can otherwise
# keep a render busy for hours without ever building anything large.
MAX_RENDER_STEPS: Final = 100_000
# Characters of one rendered message (an HTML e-mail included).
MAX_OUTPUT_LENGTH: Final = 1_000_000

_UNDEFINED_NAME: Final = re.compile(r"^'(?P<name>[^']+)' is undefined$")


class TemplateRenderer:
    """Compiles message templates; owns one sandboxed environment per template kind."""

    def __init__(self) -> None:
        self._environments: dict[TemplateKind, _MessageSandbox] = {
            "text": _MessageSandbox(autoescape=False),
            "html": _MessageSandbox(autoescape=True),
        }

    def compile_template(
        self, source: str, *, name: str, kind: TemplateKind = "text", first_line: int = 1
    ) -> CompiledTemplate:
        """Compile `source` once for many renders, or raise TemplateError with the line.

        `name` is what errors show (a file path, or `file.toml: stages.x.template` for an
        inline template); `first_line` is the line of the file where the template starts, so
        that errors in inline templates point at the right line of the TOML file.
        """
        if kind not in self._environments:
            raise ValueError(f"unknown template kind {kind!r}: expected 'text' or 'html'")
        environment = self._environments[kind]
        try:
            tree = environment.parse(source, name=name, filename=name)
            variables = frozenset(meta.find_undeclared_variables(tree)) - environment.globals.keys()
            tree = _Instrument().visit(tree)
            code: CodeType = environment.compile(tree, name=name, filename=name)
            template = environment.template_class.from_code(
                environment, code, environment.make_globals(None)
            )
        except TemplateSyntaxError as exc:
            line = _file_line(exc.lineno, first_line)
            raise TemplateError(
                [Problem(f"template syntax error: {exc.message or exc}", file=name, line=line)]
            ) from exc
        except Exception as exc:  # e.g. RecursionError on absurdly nested templates
            raise TemplateError(
                [Problem(f"template cannot be compiled: {_describe(exc)}", file=name)]
            ) from exc
        return CompiledTemplate(
            template, name=name, kind=kind, first_line=first_line, variables=variables
        )

    def load_template_file(self, path: Path, *, kind: TemplateKind = "text") -> CompiledTemplate:
        """Read a UTF-8 template file and compile it, or raise TemplateError naming the path."""
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise TemplateError([Problem("template file not found", file=str(path))]) from exc
        except OSError as exc:
            raise TemplateError(
                [Problem(f"template file cannot be read: {exc.strerror or exc}", file=str(path))]
            ) from exc
        except ValueError as exc:  # a NUL in the name, which no file system accepts
            raise TemplateError(
                [Problem("template file name is not a valid path", file=repr(str(path)))]
            ) from exc
        try:
            # utf-8-sig: templates saved by Windows editors often start with a BOM.
            source = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            raise TemplateError(
                [
                    Problem(
                        "template file is not valid UTF-8; save it as UTF-8",
                        file=str(path),
                        line=line,
                    )
                ]
            ) from exc
        return self.compile_template(source, name=str(path), kind=kind)


class CompiledTemplate:
    """A compiled template: render it with one recipient's variables, as often as needed."""

    __slots__ = ("_template", "first_line", "kind", "name", "variables")

    def __init__(
        self,
        template: Template,
        *,
        name: str,
        kind: TemplateKind,
        first_line: int,
        variables: frozenset[str],
    ) -> None:
        self._template = template
        self.name = name
        self.kind = kind
        self.first_line = first_line
        self.variables = variables
        """Names the template reads from its variables (columns, slogan, ...), for `check`."""

    def render(self, variables: Mapping[str, object]) -> str:
        """Return the rendered text, stripped, or raise TemplateError naming the line."""
        budget = _BUDGET.set(_Budget(MAX_RENDER_STEPS))
        try:
            return self._render(variables).strip()
        except SecurityError as exc:
            message = f"template tries to reach outside the sandbox: {exc}"
            raise self._error(message, exc) from exc
        except UndefinedError as exc:
            found = _UNDEFINED_NAME.match(str(exc))
            message = (
                f"undefined variable {found['name']!r}" if found else f"undefined value: {exc}"
            )
            raise self._error(message, exc) from exc
        except Exception as exc:
            raise self._error(f"error while rendering: {_describe(exc)}", exc) from exc
        finally:
            _BUDGET.reset(budget)

    def _render(self, variables: Mapping[str, object]) -> str:
        # Streamed and counted, so a template that writes without end stops at the cap instead
        # of being joined into one enormous string first.
        pieces: list[str] = []
        length = 0
        for piece in self._template.generate(variables):
            length += len(piece)
            if length > MAX_OUTPUT_LENGTH:
                raise OverflowError(
                    f"the message would be longer than {MAX_OUTPUT_LENGTH} characters"
                )
            pieces.append(piece)
        return "".join(pieces)

    def _error(self, message: str, exc: BaseException) -> TemplateError:
        line = _file_line(_template_line(exc, self.name), self.first_line)
        return TemplateError([Problem(message, file=self.name, line=line)])

    def __repr__(self) -> str:
        return f"CompiledTemplate(name={self.name!r}, kind={self.kind!r})"


def compile_template(
    source: str,
    *,
    name: str,
    kind: TemplateKind = "text",
    first_line: int = 1,
    renderer: TemplateRenderer | None = None,
) -> CompiledTemplate:
    """Compile `source` with `renderer` (a fresh one by default); see TemplateRenderer."""
    renderer = renderer or TemplateRenderer()
    return renderer.compile_template(source, name=name, kind=kind, first_line=first_line)


def load_template_file(
    path: Path, *, kind: TemplateKind = "text", renderer: TemplateRenderer | None = None
) -> CompiledTemplate:
    """Read and compile a template file with `renderer` (a fresh one by default)."""
    return (renderer or TemplateRenderer()).load_template_file(path, kind=kind)


def mask(value: object) -> str:
    """Return `value` masked as the logs mask addresses: `+86138****8000`, `z***@example.com`."""
    return mask_address(str(value).strip())


def format_date(value: object, fmt: str = "%Y-%m-%d") -> str:
    """Format a date or datetime (or an ISO 8601 string, as CSV columns are) with strftime."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip())
        except ValueError:
            raise ValueError(f"date filter: {value!r} is not an ISO 8601 date") from None
    if not isinstance(value, date):  # datetime is a date too
        raise TypeError(f"date filter expects a date or datetime, got {type(value).__name__}")
    return value.strftime(fmt)


class _MessageSandbox(ImmutableSandboxedEnvironment):
    """Jinja2's sandbox, strict about undefined names, capping oversized results.

    Immutable: a message has no use for `list.extend` or `dict.update`, and an `extend` of a
    list with itself in a loop doubles it each round.
    """

    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def __init__(self, *, autoescape: bool) -> None:
        super().__init__(
            undefined=StrictUndefined, autoescape=autoescape, keep_trailing_newline=False
        )
        self.filters["mask"] = mask
        self.filters["date"] = format_date
        for filter_name, check in _FILTER_CHECKS.items():
            self.filters[filter_name] = _checked_filter(self.filters[filter_name], check)

    def call(
        __self,  # Jinja2's own spelling: no keyword argument of the call can clash with it
        __context: Context,
        __obj: Any,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        _spend_step()
        if (
            args
            and getattr(__obj, "__name__", "") == "join"
            and isinstance(getattr(__obj, "__self__", None), str)
        ):
            # str.join: measured before it runs, so a generator is read into a list first.
            items = list(args[0])
            _check_length(_text_length(items) + len(__obj.__self__) * len(items))
            args = (items, *args[1:])
        _check_call(__obj, args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)

    def counted(self, iterable: Iterable[Any]) -> Iterator[Any]:
        """`iterable`, one render step per item: what every `{% for %}` loops over."""
        for item in iterable:
            _spend_step()
            yield item

    def bounded(self, value: Any) -> Any:
        """`value` (a `~` concatenation), unless it is longer than a whole message may be."""
        _check_length(value)
        return value

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for sequence, count in ((left, right), (right, left)):
                if (
                    isinstance(sequence, str | list | tuple)
                    and isinstance(count, int)
                    and len(sequence) * count > MAX_REPEATED_LENGTH
                ):
                    # OverflowError, as Jinja2's own cap on range() raises.
                    raise OverflowError(
                        f"repetition would build more than {MAX_REPEATED_LENGTH} items"
                    )
                if isinstance(sequence, list | tuple) and isinstance(count, int):
                    # Few items, each a long text: printed, the list would still be enormous.
                    _check_length(_text_length(sequence) * count)
            if isinstance(left, int) and isinstance(right, int):
                _check_bits(left.bit_length() + right.bit_length())
        elif operator == "+":
            if isinstance(left, str | list | tuple) and isinstance(right, str | list | tuple):
                _check_length(len(left) + len(right))
        elif operator == "**" and isinstance(right, int):
            if abs(right) > MAX_EXPONENT:
                raise OverflowError(f"exponent larger than {MAX_EXPONENT}")
            if isinstance(left, int):
                _check_bits(left.bit_length() * abs(right))
        elif operator == "%" and isinstance(left, str):
            _check_percent_format(left, right)
        return super().call_binop(context, operator, left, right)


# -- bounds on what one render may cost ------------------------------------------------------


@dataclass(slots=True)
class _Budget:
    steps_left: int


# Per render (a ContextVar, so concurrent renders in threads or tasks each count their own);
# unset while compiling, when Jinja2 folds constants.
_BUDGET: ContextVar[_Budget | None] = ContextVar("dispatcher_render_budget", default=None)


def _spend_step() -> None:
    budget = _BUDGET.get()
    if budget is not None:
        budget.steps_left -= 1
        if budget.steps_left < 0:
            raise OverflowError(
                f"the template takes more than {MAX_RENDER_STEPS} steps (loop rounds and calls)"
            )


class _Instrument(NodeTransformer):
    """Rewrites a parsed template so that the sandbox sees what it cannot intercept itself.

    Every `{% for %}` loops over `environment.counted(...)` (one step per round), and every
    `a ~ b` goes through `environment.bounded(...)` (a length cap): in a loop, a namespace
    concatenated with itself doubles each round.
    """

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)  # in place
        node.iter = _environment_call("counted", node.iter)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return _environment_call("bounded", node)


def _environment_call(method: str, argument: nodes.Node) -> nodes.Call:
    return nodes.Call(
        nodes.EnvironmentAttribute(method, lineno=argument.lineno),
        [argument],
        [],
        None,
        None,
        lineno=argument.lineno,
    )


def _text_length(sequence: list[Any] | tuple[Any, ...]) -> int:
    return sum(len(item) if isinstance(item, str) else 1 for item in sequence)


def _check_length(value: object) -> None:
    length = value if isinstance(value, int) else len(value) if isinstance(value, str) else 0
    if length > MAX_OUTPUT_LENGTH:
        raise OverflowError(f"a text longer than {MAX_OUTPUT_LENGTH} characters")


def _check_bits(bits: int) -> None:
    if bits > MAX_INTEGER_BITS:
        raise OverflowError(f"a number of more than {MAX_INTEGER_BITS} bits")


def _check_size(size: object, what: str = "a width or count") -> None:
    if isinstance(size, int) and abs(size) > MAX_REPEATED_LENGTH:
        raise OverflowError(f"{what} larger than {MAX_REPEATED_LENGTH}")


def _check_format_spec(spec: str, args: Iterable[Any]) -> None:
    for width in re.findall(r"\d+", spec):
        if len(width) > 6 or int(width) > MAX_REPEATED_LENGTH:
            raise OverflowError(f"a format width or precision larger than {MAX_REPEATED_LENGTH}")
    if "*" in spec or "{" in spec:  # the width comes from the arguments
        for value in args:
            _check_size(value, "a format width or precision")


# A printf-style conversion: %[(key)][flags][width][.precision]
_PERCENT_SPEC: Final = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(?:\*|\d+)?(?:\.(?:\*|\d+))?")


def _check_percent_format(template: str, values: object) -> None:
    args = values if isinstance(values, tuple) else (values,)
    for spec in _PERCENT_SPEC.findall(template):
        _check_format_spec(spec, args)


def _check_call(obj: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    """Refuse calls whose arguments ask for an enormous result (`'x'.zfill(10**9)`)."""
    name = getattr(obj, "__name__", "")
    owner = getattr(obj, "__self__", None)
    if isinstance(owner, str):
        if name in ("center", "ljust", "rjust", "zfill"):
            _check_size(args[0] if args else kwargs.get("width"))
        elif name == "expandtabs":
            size = args[0] if args else kwargs.get("tabsize", 8)
            _check_size(owner.count("\t") * size if isinstance(size, int) else 0)
        elif name == "replace" and len(args) >= 2 and isinstance(args[1], str):
            _check_length(_replaced_size(owner, args[0], args[1]))
    # The sandbox hands out str.format as a wrapper around the bound method.
    template = getattr(getattr(obj, "__wrapped__", None), "__self__", None)
    if name in ("format", "format_map") and isinstance(template, str):
        values = [*args, *kwargs.values()]
        if name == "format_map" and args and isinstance(args[0], Mapping):
            values = list(args[0].values())
        for _, _, spec, _ in string.Formatter().parse(template):
            if spec:
                _check_format_spec(spec, values)
    if obj is generate_lorem_ipsum:
        bound = inspect.signature(generate_lorem_ipsum).bind(*args, **kwargs)
        bound.apply_defaults()
        counts = (bound.arguments["n"], bound.arguments["min"], bound.arguments["max"])
        if all(isinstance(count, int) for count in counts):
            _check_size(counts[0] * max(counts[1:]), "the number of words")


def _replaced_size(text: object, old: object, new: str) -> int:
    text = str(text)
    hits = len(text) + 1 if old == "" else text.count(str(old))
    return hits * len(new)


def _check_center(arguments: Mapping[str, Any]) -> None:
    _check_size(arguments["width"])


def _check_indent(arguments: Mapping[str, Any]) -> None:
    width = arguments["width"]
    per_line = width if isinstance(width, int) else len(str(width))
    _check_length((str(arguments["s"]).count("\n") + 1) * per_line)


def _check_format(arguments: Mapping[str, Any]) -> None:
    values = tuple(arguments["args"]) or tuple(arguments["kwargs"].values())
    _check_percent_format(str(arguments["value"]), values)


def _check_join(arguments: dict[str, Any]) -> None:
    items = list(arguments["value"])
    arguments["value"] = items  # a generator can be read only once
    _check_length(_text_length(items) + len(str(arguments["d"])) * len(items))


def _check_wordwrap(arguments: Mapping[str, Any]) -> None:
    wrap = arguments["wrapstring"]
    width = arguments["width"]
    if isinstance(wrap, str) and isinstance(width, int):
        _check_length(len(str(arguments["s"])) // max(width, 1) * len(wrap))


def _check_replace(arguments: Mapping[str, Any]) -> None:
    new = arguments["new"]
    if isinstance(new, str):
        _check_length(_replaced_size(arguments["s"], arguments["old"], new))


# Filters whose arguments set the size of what they build, and how to check them.
_FILTER_CHECKS: Final[Mapping[str, Callable[[dict[str, Any]], None]]] = {
    "center": _check_center,
    "indent": _check_indent,
    "format": _check_format,
    "join": _check_join,
    "wordwrap": _check_wordwrap,
    "replace": _check_replace,
    "batch": lambda arguments: _check_size(arguments["linecount"]),
    "slice": lambda arguments: _check_size(arguments["slices"]),
}


def _checked_filter(
    function: Callable[..., Any], check: Callable[[dict[str, Any]], None]
) -> Callable[..., Any]:
    signature = inspect.signature(function)

    @functools.wraps(function)  # keeps Jinja2's pass_context/pass_environment marks
    def checked(*args: Any, **kwargs: Any) -> Any:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            return function(*args, **kwargs)  # let the filter say what is wrong
        bound.apply_defaults()
        check(bound.arguments)
        return function(*bound.args, **bound.kwargs)

    return checked


def _template_line(exc: BaseException, filename: str) -> int | None:
    """Return the template line where `exc` was raised, from Jinja2's rewritten traceback."""
    line = None
    frame = exc.__traceback__
    while frame is not None:
        if frame.tb_frame.f_code.co_filename == filename:
            line = frame.tb_lineno
        frame = frame.tb_next
    return line


def _file_line(template_line: int | None, first_line: int) -> int | None:
    return None if template_line is None else first_line + template_line - 1


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
