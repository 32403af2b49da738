"""mkdocs hook: replaces ``<!-- support-table -->`` in a page with the support
matrix generated from diffeqkit's registry."""

from __future__ import annotations

from typing import Any

MARKER = "<!-- support-table -->"


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    if MARKER not in markdown:
        return markdown
    from diffeqkit._info import support_table

    return markdown.replace(MARKER, support_table())
