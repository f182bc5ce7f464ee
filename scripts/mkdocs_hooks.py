"""MkDocs hook: the configuration page's key tables, generated from the schema."""

from __future__ import annotations

from typing import Any

from fedalora.config import key_reference

MARKER = "<!-- run-config keys -->"


def on_page_markdown(markdown: str, **_: Any) -> str:
    """Put the key reference where the page has the marker."""
    return markdown.replace(MARKER, "\n".join(key_reference()))
