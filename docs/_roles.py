"""mkdocs hook: render the Sphinx roles of difsolve's docstrings (``:class:`~difsolve.X```,
``:func:``, ``:meth:``, ...) as code, the way Sphinx shows them (``~`` keeps the last name)."""

from __future__ import annotations

import re

ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc):<code>(~?)([^<]+)</code>")


def _render(match: re.Match) -> str:
    short, target = match.group(1), match.group(2)
    return f"<code>{target.rsplit('.', 1)[-1] if short else target}</code>"


def on_page_content(html: str, **kwargs) -> str:
    return ROLE.sub(_render, html)
