r"""MkDocs hooks (`hooks:` in mkdocs.yml).

- The committed reports in `results/` become part of the site: their figures, CSVs and commands as files, their
  Markdown as pages, so the findings pages embed the figures the report commands write and link the data behind
  them (a link to a file outside `docs/` would fail the strict build).
- A page line `--8<-- "README.md:<name>"` is replaced by the README's text between its markers
  `--8<-- [start:<name>]` and `--8<-- [end:<name>]` (HTML comments there), so the introduction and the findings
  are written once. The README links pages as `docs/<page>.md`, which is right on GitHub; on a page of the site
  those links are made relative to that page.
- A pipe in inline code in a table is written `\|`, as GitHub needs; Python-Markdown keeps the backslash in code,
  so it is dropped from the page.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
REPORT_FILES = {".png", ".csv", ".txt", ".md"}
README = ROOT / "README.md"
README_LINK = re.compile(r"\]\(docs/([^)\s]+)\)")
INLINE_CODE = re.compile(r"<code>([^<]*)</code>")
INCLUDE = re.compile(r'^--8<-- "README\.md:([\w-]+)"[ \t]*$', re.MULTILINE)


def on_files(files: Files, config) -> Files:
    for path in sorted(RESULTS.rglob("*")):
        if path.is_file() and path.suffix in REPORT_FILES:
            uri = path.relative_to(ROOT).as_posix()
            if files.get_file_from_path(uri) is None:
                files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


def readme_section(name: str) -> str:
    """The README's lines between the markers of section `name` (an error naming it when a marker is missing)."""
    lines = README.read_text().splitlines()
    marks = [i for i, line in enumerate(lines) if f"--8<-- [start:{name}]" in line or f"--8<-- [end:{name}]" in line]
    if len(marks) != 2:
        raise ValueError(f"README.md: no section {name!r} (markers --8<-- [start:{name}] and [end:{name}])")
    return "\n".join(lines[marks[0] + 1 : marks[1]])


def on_page_markdown(markdown: str, page, config, files) -> str:
    here = posixpath.dirname(page.file.src_uri) or "."
    markdown = INCLUDE.sub(lambda m: readme_section(m.group(1)), markdown)
    return README_LINK.sub(lambda m: f"]({posixpath.relpath(m.group(1), here)})", markdown)


def on_page_content(html: str, page, config, files) -> str:
    return INLINE_CODE.sub(lambda m: "<code>" + m.group(1).replace("\\|", "|") + "</code>", html)
