"""Safe Markdown for the studio's pages (report cards, notes, model output).

    from studio.render import markdown_html
    html = markdown_html(report_text)   # a SafeString, ready for {{ html }}

Two lines of defence, because the text comes from runs (events, configs,
model samples) and is untrusted:

1. Markdown is rendered with raw HTML turned off, so `<script>` in the source
   is shown as the text "<script>" instead of becoming (or silently losing)
   an element.
2. The HTML is then cleaned by nh3 with a short allow-list of tags and
   attributes, and links keep only http(s), mailto and relative URLs.

Views call markdown_html and pass the result to the template; there is
deliberately no template tag, so the one place that marks text safe is here.
"""

from __future__ import annotations

import markdown
import nh3
from django.utils.safestring import SafeString, mark_safe

EXTENSIONS = ["tables", "fenced_code", "sane_lists"]

ALLOWED_TAGS = {
    "p", "h1", "h2", "h3", "h4", "h5", "h6",
    "table", "thead", "tbody", "tr", "th", "td",
    "code", "pre", "em", "strong", "ul", "ol", "li", "blockquote", "hr", "br", "a",
}
# Only href: table alignment styles, code classes and titles are not needed.
ALLOWED_ATTRIBUTES = {"a": {"href"}}
URL_SCHEMES = {"http", "https", "mailto"}


def _markdown() -> markdown.Markdown:
    md = markdown.Markdown(extensions=EXTENSIONS, output_format="html")
    # Without these two, raw HTML passes through as HTML (block and inline).
    # Removed, the escaper turns every '<' of the source into '&lt;', so the
    # text is displayed verbatim instead of being interpreted or dropped.
    md.preprocessors.deregister("html_block")
    md.inlinePatterns.deregister("html")
    return md


def markdown_html(text: str) -> SafeString:
    """Markdown -> sanitised HTML, marked safe for templates."""
    # A fresh converter per call: Markdown instances keep state between
    # conversions and are not safe to share across the server's threads.
    html = _markdown().convert(text or "")
    clean = nh3.clean(
        html,
        tags=ALLOWED_TAGS,
        attributes=ALLOWED_ATTRIBUTES,
        url_schemes=URL_SCHEMES,
        link_rel="noopener noreferrer",
        strip_comments=True,
    )
    return mark_safe(clean)
