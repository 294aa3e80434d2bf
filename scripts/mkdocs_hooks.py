"""MkDocs hooks (mkdocs.yml `hooks:`).

- The site shows BENCHMARKS.md from the repository root as benchmarks.md. BENCHMARKS.md is written for
  readers of the repository: its links to docs pages start with `docs/`, and it may link files (scripts,
  results) that are not pages. On the site those links are made relative to docs/, or left as their text,
  so `mkdocs build --strict` checks the links that can work on the site.
- README.md is not a page of the site, but its relative links (docs pages, the screenshot) are checked
  here too: a missing target is a warning, which fails `mkdocs build --strict`."""

from __future__ import annotations

import logging
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("mkdocs.hooks.lakelens")
INCLUDED = {"benchmarks.md": ROOT / "BENCHMARKS.md"}
LINK = re.compile(r"(?<!!)\[([^\]]*)\]\(([^)\s]+)\)")


def _site_link(match: re.Match) -> str:
    text, target = match.groups()
    if re.match(r"[a-z]+:|#", target):  # a URL or an anchor on the same page
        return match.group(0)
    if target.startswith(("docs/", "./docs/")):
        return f"[{text}]({target.split('docs/', 1)[1]})"
    if target.split("#")[0] == "README.md":
        return f"[{text}](index.md)"
    return text  # a file of the repository that is not a page of the site


def on_pre_build(config) -> None:
    readme = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", readme):
        if not re.match(r"[a-z]+:|#", target) and not (ROOT / target.split("#")[0]).exists():
            log.warning(f"README.md links {target!r}, which does not exist")


def on_page_markdown(markdown: str, page, config, files) -> str:
    source = INCLUDED.get(page.file.src_uri)
    if source is None:
        return markdown
    return LINK.sub(_site_link, source.read_text())
