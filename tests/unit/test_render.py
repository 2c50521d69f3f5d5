"""Sandboxed message templates: compile errors, render errors, sandbox escapes, filters."""

from __future__ import annotations

from datetime import date, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatcher.errors import DispatcherError, TemplateError
from dispatcher.render import (
    CompiledTemplate,
    TemplateRenderer,
    compile_template,
    load_template_file,
)

INLINE = "campaigns/qm.toml: stages.opening.template"


@pytest.fixture
def renderer() -> TemplateRenderer:
    return TemplateRenderer()


def raised(template: CompiledTemplate, variables: dict[str, object]) -> TemplateError:
    with pytest.raises(TemplateError) as caught:
        template.render(variables)
    return caught.value


def test_compiled_once_rendered_many_times_and_stripped(renderer: TemplateRenderer) -> None:
    template = renderer.compile_template(
        "\n  {{ name }}您好，{{ city }}质监局提醒您。\n\n", name="t"
    )
    assert template.render({"name": "张三", "city": "北京"}) == "张三您好，北京质监局提醒您。"
    assert template.render({"name": "李四", "city": "上海"}) == "李四您好，上海质监局提醒您。"


def test_variables_lists_what_the_template_reads_and_nothing_it_defines(
    renderer: TemplateRenderer,
) -> None:
    source = (
        "{% set greeting = '您好' %}{{ greeting }}{{ name }}"
        "{% for item in items %}{{ item }}{{ loop.index }}{% endfor %}"
        "{% for n in range(2) %}{{ n }}{% endfor %}{{ slogan.text }}"
    )
    template = renderer.compile_template(source, name="t")
    assert template.variables == frozenset({"name", "items", "slogan"})


def test_syntax_error_in_an_inline_template_points_at_the_toml_line(
    renderer: TemplateRenderer,
) -> None:
    with pytest.raises(TemplateError) as caught:
        renderer.compile_template("第一行\n第二行\n{{ name | }}\n", name=INLINE, first_line=12)
    [problem] = caught.value.problems
    assert problem.file == INLINE
    assert problem.line == 14
    assert "syntax error" in problem.message
    assert str(caught.value).startswith(f"{INLINE}:14: template syntax error")


def test_unknown_filter_is_a_compile_error_with_its_line(renderer: TemplateRenderer) -> None:
    with pytest.raises(TemplateError) as caught:
        renderer.compile_template("a\n{{ phone | unmask }}", name="t.j2")
    [problem] = caught.value.problems
    assert (problem.file, problem.line) == ("t.j2", 2)
    assert "unmask" in problem.message


def test_unclosed_block_is_a_compile_error(renderer: TemplateRenderer) -> None:
    with pytest.raises(TemplateError) as caught:
        renderer.compile_template("{% if vip %}\n尊敬的{{ name }}\n", name="t.j2")
    [problem] = caught.value.problems
    assert problem.file == "t.j2"
    assert "endif" in problem.message


def test_undefined_variable_names_template_line_and_variable(renderer: TemplateRenderer) -> None:
    template = renderer.compile_template(
        "{{ name }}您好，\n欢迎参加{{ city }}的质量月活动", name=INLINE, first_line=20
    )
    error = raised(template, {"name": "张三"})
    [problem] = error.problems
    assert (problem.file, problem.line) == (INLINE, 21)
    assert problem.message == "undefined variable 'city'"


def test_undefined_attribute_is_a_template_error(renderer: TemplateRenderer) -> None:
    template = renderer.compile_template("{{ row.city }}", name="t")
    error = raised(template, {"row": {"name": "张三"}})
    assert error.problems[0].line == 1
    assert "undefined value" in error.problems[0].message
    assert "city" in error.problems[0].message


def test_strict_undefined_also_fails_in_conditions(renderer: TemplateRenderer) -> None:
    template = renderer.compile_template("{% if vip %}尊敬的{% endif %}{{ name }}", name="t")
    assert raised(template, {"name": "张三"}).problems[0].message == "undefined variable 'vip'"
    guarded = renderer.compile_template(
        "{% if vip is defined %}尊敬的{% endif %}{{ name }}", name="t"
    )
    assert guarded.render({"name": "张三"}) == "张三"


@pytest.mark.parametrize(
    "payload",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ joiner.__init__.__globals__.os.popen('id').read() }}",
        "{{ lipsum.__globals__['os'].popen('id').read() }}",
        "{{ namespace.__init__.__globals__ }}",
        "{{ dict.__base__.__subclasses__() }}",
        "{{ range.__globals__ }}",
        "{{ self._TemplateReference__context }}",
        "{{ '{0.__class__}'.format(1) }}",
        "{{ name.__class__.__base__.__subclasses__() }}",
        "{% set x = cycler.__init__ %}{{ x.__globals__ }}",
        "{{ (name|attr('__class__')).__mro__ }}",
    ],
)
def test_sandbox_escapes_are_template_errors(renderer: TemplateRenderer, payload: str) -> None:
    template = renderer.compile_template(f"您好\n{payload}", name="evil.j2")
    error = raised(template, {"name": "张三"})
    [problem] = error.problems
    assert problem.message.startswith("template tries to reach outside the sandbox: ")
    assert (problem.file, problem.line) == ("evil.j2", 2)


@pytest.mark.parametrize(
    ("source", "variables", "expected"),
    [
        ("{{ 1 / n }}", {"n": 0}, "ZeroDivisionError"),
        ("{{ name | round }}", {"name": "张三"}, "TypeError"),
        ("{{ when | date('%Y') }}", {"when": 2010}, "date filter expects a date"),
        ("{{ when | date }}", {"when": "8月31日"}, "not an ISO 8601 date"),
        ("{{ range(10 ** 6) | list | length }}", {}, "OverflowError"),
        ("{{ '质量' * n }}", {"n": 10**9}, "OverflowError"),
        ("{{ n ** n }}", {"n": 10**6}, "OverflowError"),
        ("{{ items[5] }}", {"items": [1]}, "undefined value"),
        ("{{ name.upper(1, 2) }}", {"name": "x"}, "TypeError"),
    ],
)
def test_errors_while_rendering_are_template_errors_with_the_line(
    renderer: TemplateRenderer, source: str, variables: dict[str, object], expected: str
) -> None:
    template = renderer.compile_template(f"第一行\n第二行 {source}", name=INLINE, first_line=7)
    error = raised(template, variables)
    [problem] = error.problems
    assert expected in problem.message
    assert (problem.file, problem.line) == (INLINE, 8)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="{}%#|.()[]'\"ab1 +*/-_~,:=!<>\n", max_size=40))
def test_no_raw_exception_leaves_compile_or_render(source: str) -> None:
    try:
        template = compile_template(source, name="fuzz")
        template.render({"a": 1, "b": "x"})
    except TemplateError as exc:
        assert exc.problems[0].file == "fuzz"


def test_html_templates_autoescape_and_text_templates_do_not(renderer: TemplateRenderer) -> None:
    variables = {"name": "<script>alert('x')</script> & Co"}
    html = renderer.compile_template("<p>{{ name }}</p>", name="t.html", kind="html")
    assert html.render(variables) == (
        "<p>&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; Co</p>"
    )
    text = renderer.compile_template("{{ name }}", name="t.txt")
    assert text.render(variables) == variables["name"]


def test_mask_filter_masks_phone_numbers_and_emails(renderer: TemplateRenderer) -> None:
    template = renderer.compile_template("{{ phone | mask }} {{ email | mask }}", name="t")
    variables = {"phone": " +8613812348000 ", "email": "zhang.san@aqsiq.gov.cn"}
    assert template.render(variables) == "+86138****8000 z***@aqsiq.gov.cn"


def test_date_filter_formats_dates_datetimes_and_iso_strings(renderer: TemplateRenderer) -> None:
    template = renderer.compile_template("{{ when | date('%Y年%m月%d日') }}", name="t")
    assert template.render({"when": date(2010, 8, 31)}) == "2010年08月31日"
    assert template.render({"when": datetime(2010, 9, 1, 8, 30)}) == "2010年09月01日"
    assert template.render({"when": "2010-09-30"}) == "2010年09月30日"
    default = renderer.compile_template("{{ when | date }}", name="t")
    assert default.render({"when": datetime(2010, 8, 31, 9)}) == "2010-08-31"


def test_load_template_file_reads_utf8_with_or_without_bom(tmp_path: Path) -> None:
    plain = tmp_path / "opening.txt"
    plain.write_text("{{ name }}：抓质量水平提升\u3000促发展方式转变\n", encoding="utf-8")
    bom = tmp_path / "bom.txt"
    bom.write_text("{{ name }}您好", encoding="utf-8-sig")
    assert load_template_file(plain).render({"name": "张三"}) == (
        "张三：抓质量水平提升\u3000促发展方式转变"
    )
    assert load_template_file(bom).render({"name": "张三"}) == "张三您好"
    assert load_template_file(plain, kind="html").kind == "html"


def test_missing_template_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "missing.txt"
    with pytest.raises(TemplateError) as caught:
        load_template_file(path)
    assert caught.value.problems[0].file == str(path)
    assert "not found" in str(caught.value)


def test_template_file_that_is_not_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "gbk.txt"
    path.write_bytes("first line\n{{ name }}您好".encode("gb18030"))
    with pytest.raises(TemplateError) as caught:
        load_template_file(path)
    [problem] = caught.value.problems
    assert (problem.file, problem.line) == (str(path), 2)
    assert "UTF-8" in problem.message


def test_errors_in_a_template_file_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "reminder.txt"
    path.write_text("{{ name }}\n{{ city }}\n", encoding="utf-8")
    error = raised(load_template_file(path), {"name": "张三"})
    assert str(error) == f"{path}:2: undefined variable 'city'"


def test_template_errors_are_operator_errors() -> None:
    assert issubclass(TemplateError, DispatcherError)
