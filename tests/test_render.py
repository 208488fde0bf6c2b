"""studio.render.markdown_html: Markdown for the pages, with untrusted HTML shown as text."""

from studio.render import markdown_html


def test_script_tag_is_shown_as_text():
    html = markdown_html("before <script>alert(1)</script> after")
    assert "<script" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_script_block_is_shown_as_text():
    html = markdown_html("<script>\nalert(1)\n</script>\n")
    assert "<script" not in html
    assert "&lt;script&gt;" in html


def test_img_with_onerror_never_becomes_an_element():
    for text in ("<img src=x onerror=alert(1)>", "text <img src=x onerror=alert(1)> text", "![x](x)"):
        assert "<img" not in markdown_html(text)


def test_javascript_link_loses_its_href():
    for target in ("javascript:alert(1)", "JaVaScRiPt:alert(1)", "data:text/html,hi"):
        html = markdown_html(f"[x]({target})")
        assert "href" not in html, html
        assert ">x</a>" in html


def test_http_and_relative_links_keep_href_and_get_rel():
    html = markdown_html("[a](https://example.com/x) [b](/runs/1/) [c](mailto:me@example.com)")
    assert 'href="https://example.com/x"' in html
    assert 'href="/runs/1/"' in html
    assert 'href="mailto:me@example.com"' in html
    assert html.count('rel="noopener noreferrer"') == 3


def test_tables_render():
    html = markdown_html("| a | b |\n|---|---|\n| 1 | `x` |\n")
    assert "<table>" in html
    assert "<th>a</th>" in html
    assert "<td><code>x</code></td>" in html


def test_table_alignment_styles_are_dropped():
    html = markdown_html("| a | b |\n|:---|---:|\n| 1 | 2 |\n")
    assert "<td>1</td>" in html
    assert "style" not in html


def test_fenced_code_renders_as_pre_code():
    html = markdown_html("```python\nprint('hi')\n```\n")
    assert "<pre><code>print('hi')\n</code></pre>" in html


def test_html_in_code_block_is_escaped_exactly_once():
    html = markdown_html("```\n<b>bold?</b>\n```\n")
    assert "<b>" not in html
    assert html.count("&lt;b&gt;") == 1
    assert "&amp;lt;" not in html


def test_html_in_inline_code_is_escaped_exactly_once():
    html = markdown_html("use `<b>` here")
    assert "<code>&lt;b&gt;</code>" in html


def test_ordinary_markdown_elements_survive_sanitising():
    html = markdown_html("# Title\n\n*em* and **strong**\n\n- one\n- two\n\n> quote\n\n---\n")
    for tag in ("<h1>", "<em>", "<strong>", "<ul>", "<li>", "<blockquote>", "<hr"):
        assert tag in html


def test_result_is_marked_safe():
    assert hasattr(markdown_html("x"), "__html__")


def test_empty_text_gives_empty_html():
    assert markdown_html("") == ""
