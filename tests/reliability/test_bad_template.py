"""Bad templates: a TemplateError, or a harmless message; never the sandbox's outside.

Operators write message templates in campaign files. Whatever they write (random Jinja2,
known sandbox escapes, attempts to build gigabytes or loop for hours), compiling and
rendering end in a `TemplateError` naming the template, or in a message of bounded length,
within a bounded time, that shows nothing of Python's internals (modules, classes, globals).
"""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dispatcher.errors import TemplateError
from dispatcher.render import MAX_OUTPUT_LENGTH, TemplateRenderer

NAME = "campaigns/qm.toml"
VARIABLES: dict[str, object] = {
    "name": "张三",
    "city": "北京",
    "slogan": "抓质量水平提升 促发展方式转变",
    "address": "+8613800138000",
    "items": ["a", "b"],
}
# What a render that reached outside the sandbox would show (unless the template's own text
# says it): modules, the class tree, a function's globals.
LEAKS = ("<module", "<class 'object'>", "<class 'type'>", "_frozen_importlib", "'__builtins__'")
# Per render, however hostile the template: a bound on time that a runaway loop cannot meet.
SECONDS = 5.0


def outcome(source: str, kind: str = "text") -> str | TemplateError:
    """Compile and render `source`: the message, or the TemplateError, checked either way."""
    renderer = TemplateRenderer()
    started = time.monotonic()
    try:
        template = renderer.compile_template(source, name=NAME, kind=kind)  # type: ignore[arg-type]
        message = template.render(VARIABLES)
    except TemplateError as exc:
        assert time.monotonic() - started < SECONDS, f"took {time.monotonic() - started:.1f}s"
        assert exc.problems and all(p.file == NAME for p in exc.problems), exc.problems
        assert "Traceback" not in str(exc)
        return exc
    assert time.monotonic() - started < SECONDS, f"took {time.monotonic() - started:.1f}s"
    assert isinstance(message, str)
    assert len(message) <= MAX_OUTPUT_LENGTH
    for leak in LEAKS:
        assert leak not in message or leak in source, f"{leak!r} in {message[:200]!r}"
    return message


# -- known escapes and exhaustion attempts ---------------------------------------------------------

ESCAPES = [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os }}",
    "{{ joiner.__init__.__globals__.os.system('id') }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ self._TemplateReference__context }}",
    "{{ self.__init__.__globals__ }}",
    "{{ lipsum.__globals__ }}",
    "{{ lipsum.__globals__['os'].popen('id').read() }}",
    "{{ config }}",
    "{{ request }}",
    "{{ '{0.__class__}'.format('') }}",
    "{{ '{0.__class__.__mro__}'.format(name) }}",
    "{{ '{0.__globals__}'.format(lipsum) }}",
    "{{ '%s' % ''.__class__ }}",
    "{{ ''|attr('__class__') }}",
    "{{ (''|attr('__class__')|attr('__mro__'))[1] }}",
    "{{ ()|attr('__class__')|attr('__base__')|attr('__subclasses__')() }}",
    "{{ name.__class__.__base__.__subclasses__() }}",
    "{{ items.pop() }}",
    "{{ items.append(1) }}",
    "{% set x = items.extend(items) %}",
    "{{ range.__globals__ }}",
    "{{ ''.format_map.__self__.__class__ }}",
    "{% include '/etc/passwd' %}",
    "{% extends '/etc/passwd' %}",
    "{% import 'os' as os %}",
]


@pytest.mark.parametrize("source", ESCAPES)
@pytest.mark.parametrize("kind", ["text", "html"])
def test_sandbox_escapes_are_template_errors(source: str, kind: str) -> None:
    assert isinstance(outcome(source, kind), TemplateError), source


EXHAUSTION = [
    "{% for x in range(10**9) %}{% endfor %}",
    "{% for x in range(10**9) %}{{ x }}{% endfor %}",
    "{{ 'a' * 10**9 }}",
    "{{ [1] * 10**9 }}",
    "{{ ['x' * 100000] * 100000 }}",
    "{{ 9 ** (10**9) }}",
    "{{ (2**10000) ** 10000 }}",
    "{% set ns = namespace(v=3) %}{% for i in range(64) %}{% set ns.v = ns.v * ns.v %}{% endfor %}",
    "{{ 'x'.zfill(10**9) }}",
    "{{ 'x'.ljust(10**9) }}",
    "{{ 'x'.center(10**9) }}",
    "{{ ('\t' * 1000).expandtabs(100000) }}",
    "{{ 'x'|center(10**9) }}",
    "{{ 'x'|indent(10**9, true) }}",
    "{{ '{:>1000000000}'.format(1) }}",
    "{{ '{:{w}}'.format(1, w=10**9) }}",
    "{{ '%1000000000d' % 1 }}",
    "{{ '%*d' % (10**9, 1) }}",
    "{{ '%.1000000000f' % 1.0 }}",
    "{{ '%.1000000000f'|format(1.0) }}",
    "{{ lipsum(10**6) }}",
    "{{ ('a' * 100000)|replace('a', 'b' * 100000) }}",
    "{{ ('a' * 100000).replace('a', 'b' * 100000) }}",
    "{{ range(100000)|join('x' * 100000) }}",
    "{{ ('x' * 100000).join(range(100000)|map('string')) }}",
    "{{ range(10)|batch(10**9, 'x')|list }}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}",
    "{% macro m(n) %}{% if n %}{{ m(n - 1) }}{{ m(n - 1) }}{% endif %}{% endmacro %}{{ m(40) }}",
    "{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}",
    "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "{% set ns = namespace(l=[1]) %}{% for i in range(64) %}{% set ns.l = ns.l + ns.l %}{% endfor %}",
    "{% set ns = namespace(l=[1]) %}{% for i in range(64) %}{% set _ = ns.l.extend(ns.l) %}{% endfor %}",
]


@pytest.mark.parametrize("source", EXHAUSTION)
def test_attempts_to_exhaust_memory_or_time_are_template_errors(source: str) -> None:
    assert isinstance(outcome(source), TemplateError), source


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        # What the bounds must not break.
        ("{{ '{:,}'.format(1234567) }}", "1,234,567"),
        ("{{ '%05.1f'|format(3.14159) }}", "003.1"),
        ("{{ '%d 条' % 1234567 }}", "1234567 条"),
        ("{% for x in items %}{{ loop.index }}{{ x }}{{ loop.last }}{% endfor %}", "1aFalse2bTrue"),
        ("{% for x in [] %}a{% else %}无{% endfor %}", "无"),
        ("{% for k, v in {'a': 1}.items() %}{{ k }}={{ v }}{% endfor %}", "a=1"),
        (
            "{% for x in [[1, [2]]] recursive %}{{ x if x is number else loop(x) }}{% endfor %}",
            "12",
        ),
        ("{{ items|join('、') }}{{ '-'.join(items) }}", "a、ba-b"),
        ("{{ name ~ '，' ~ city }}", "张三，北京"),
        ("{{ 'ab' * 3 }}{{ [name] + [city] }}", "ababab['张三', '北京']"),
        ("{{ (name * 100)|length }}", "200"),
        ("{% for i in range(1000) %}{% for j in range(50) %}{% endfor %}{% endfor %}ok", "ok"),
    ],
)
def test_ordinary_templates_still_render(source: str, expected: str) -> None:
    assert outcome(source) == expected


# -- random templates ------------------------------------------------------------------------------

ATOMS = [
    "name", "city", "items", "slogan", "x", "ns.v", "loop.index", "loop", "self", "lipsum",
    "cycler", "joiner", "namespace", "range", "none", "true", "'a'", '"质量月"', "''", "'{0}'",
    "'%s'", "'%999999s'", "0", "1", "-1", "2", "99", "1.5", "100000", "10**9", "[]", "[1, 'a']",
    "{}", "{'k': name}", "undefined_thing",
]  # fmt: skip
OPERATORS = ["+", "-", "*", "**", "/", "//", "%", "~", "==", "<", " and ", " or ", " in "]
FILTERS = [
    "length", "join", "list", "string", "upper", "first", "last", "reverse", "unique", "sort",
    "center", "indent", "replace", "format", "batch", "slice", "wordwrap", "truncate", "mask",
    "date", "safe", "e", "int", "abs", "sum", "map", "select", "attr", "default", "tojson",
    "urlize", "xmlattr", "dictsort", "groupby", "random", "filesizeformat", "pprint", "title",
]  # fmt: skip
ATTRIBUTES = [
    "__class__", "__mro__", "__subclasses__", "__globals__", "__init__", "__dict__", "format",
    "format_map", "zfill", "ljust", "center", "expandtabs", "join", "replace", "split", "upper",
    "items", "keys", "pop", "append", "extend", "update", "mro", "__self__", "gi_frame", "count",
]  # fmt: skip


def _expressions(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        st.tuples(children, st.sampled_from(OPERATORS), children).map("".join),
        st.tuples(children, st.sampled_from(FILTERS)).map("|".join),
        st.tuples(children, st.sampled_from(FILTERS), children).map("{0[0]}|{0[1]}({0[2]})".format),
        st.tuples(children, st.sampled_from(ATTRIBUTES)).map(".".join),
        st.tuples(children, st.sampled_from(ATTRIBUTES), st.lists(children, max_size=2)).map(
            lambda t: f"{t[0]}.{t[1]}({', '.join(t[2])})"
        ),
        st.tuples(children, children).map("{0[0]}[{0[1]}]".format),
        st.lists(children, max_size=3).map(lambda a: f"range({', '.join(a)})"),
        st.lists(children, max_size=2).map(lambda a: f"lipsum({', '.join(a)})"),
        children.map("({})".format),
    )


expressions = st.recursive(st.sampled_from(ATOMS), _expressions, max_leaves=8)


def _blocks(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        st.tuples(expressions, children).map("{{% for x in {0[0]} %}}{0[1]}{{% endfor %}}".format),
        st.tuples(expressions, children, children).map(
            "{{% if {0[0]} %}}{0[1]}{{% else %}}{0[2]}{{% endif %}}".format
        ),
        st.tuples(children, expressions).map(
            "{{% macro m(x) %}}{0[0]}{{% endmacro %}}{{{{ m({0[1]}) }}}}".format
        ),
        st.lists(children, max_size=3).map("".join),
    )


statements = st.recursive(
    st.one_of(
        expressions.map("{{{{ {} }}}}".format),
        expressions.map("{{% set ns = namespace(v={}) %}}".format),
        expressions.map("{{% set ns.v = {} %}}".format),
        st.text(max_size=6),
    ),
    _blocks,
    max_leaves=6,
)
jinja = st.one_of(
    statements,
    # Pieces joined without regard to syntax: mostly errors, from every corner of the parser.
    st.lists(
        st.sampled_from(["{{", "}}", "{%", "%}", "{#", "#}", "endfor", "(", ")", "|", ".", "["])
        | st.sampled_from(ATOMS + OPERATORS + FILTERS + ATTRIBUTES)
        | st.text(max_size=3),
        max_size=20,
    ).map("".join),
)


@settings(
    max_examples=200,
    deadline=timedelta(seconds=SECONDS),
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(jinja, st.sampled_from(["text", "html"]))
def test_random_templates_give_a_message_or_a_template_error(source: str, kind: str) -> None:
    outcome(source, kind)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.text(max_size=200))
def test_random_text_gives_a_message_or_a_template_error(source: str) -> None:
    outcome(source)
