"""mkdocs hook: replaces ``<!-- support-table -->`` and ``<!-- events-table -->``
in a page with the support matrix and the events table generated from
diffeqkit's registry."""

from __future__ import annotations

from typing import Any

MARKER = "<!-- support-table -->"
EVENTS_MARKER = "<!-- events-table -->"


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    from diffeqkit._info import events_table, support_table

    if MARKER in markdown:
        markdown = markdown.replace(MARKER, support_table())
    if EVENTS_MARKER in markdown:
        markdown = markdown.replace(EVENTS_MARKER, events_table())
    return markdown
