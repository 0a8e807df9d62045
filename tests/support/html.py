"""A strict reader of the HTML report: tags nest, nothing is fetched or run."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path


class _Html(HTMLParser):
    """Records tags and text, and every way the tags fail to nest."""

    VOID = {"meta", "br", "hr", "img", "input", "link", "wbr", "col"}

    def __init__(self, page: str):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.problems: list[str] = []
        self.tags: set[str] = set()
        self.text: list[str] = []
        self.feed(page)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.problems.append(f"unbalanced </{tag}>")

    def handle_data(self, data):
        self.text.append(data)


def parse_html(path: Path) -> _Html:
    page = _Html(path.read_text(encoding="utf-8"))
    assert page.problems == [] and page.stack == [], (page.problems, page.stack)
    # Self-contained: nothing the sandboxed iframe would have to fetch or run.
    assert not page.tags & {"script", "link", "img", "iframe", "object"}
    assert "http://" not in path.read_text() and "https://" not in path.read_text()
    return page
