"""Check the relative links of the user docs: README.md, TRAINING.md and docs/**/*.md.

    python scripts/check_doc_links.py [--root DIR]

Every markdown link `[text](target)`, image `![alt](target)` and reference definition
`[label]: target` whose target is relative (not http(s)://, mailto: or another scheme) must
name a file or folder that exists relative to the document; a `#anchor` (alone, or after a
markdown file) must match a heading of that file by GitHub's slug rules. Links inside code
(fenced or indented blocks, inline code spans) are not links and are skipped. Prints one line
per broken link, `file:line: target (reason)`, and exits 1 when there is any; pure Python, no
network.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from urllib.parse import unquote

DOC_GLOBS = ("README.md", "TRAINING.md", "docs/**/*.md")

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+(?:\"[^\"]*\"|'[^']*'|\([^)]*\)))?\s*\)")
_REF_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_HTML_ID = re.compile(r"""<a\s+[^>]*?(?:name|id)\s*=\s*["']([^"']+)["']""", re.IGNORECASE)
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")


def doc_files(root: Path) -> list[Path]:
    """The documents to check, each once, in a stable order."""
    found: set[Path] = set()
    for pattern in DOC_GLOBS:
        found.update(p for p in root.glob(pattern) if p.is_file())
    return sorted(found)


def prose_lines(text: str, blank_code_spans: bool = True) -> list[tuple[int, str]]:
    """(line number, line) of every line outside fenced and indented code blocks, with inline
    code spans blanked out unless `blank_code_spans` is false."""
    out: list[tuple[int, str]] = []
    fence: str | None = None
    prev_blank_or_code = True
    in_indented_code = False
    for number, line in enumerate(text.splitlines(), start=1):
        m = _FENCE.match(line)
        if fence is not None:
            if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence):
                fence = None
            continue
        if m:
            fence = m.group(1)
            continue
        blank = not line.strip()
        if not blank and line.startswith(("    ", "\t")) and (prev_blank_or_code or in_indented_code):
            in_indented_code = True
            prev_blank_or_code = True
            continue
        if not blank:
            in_indented_code = False
        prev_blank_or_code = blank
        out.append((number, _CODE_SPAN.sub(lambda s: " " * len(s.group(0)), line) if blank_code_spans else line))
    return out


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its rendered text lower-cased, punctuation dropped
    (letters, digits, `_`, `-` and spaces kept), spaces turned into hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images: their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor a markdown file offers: heading slugs (repeats get -1, -2, ...) and
    explicit `<a name=...>` / `id=...` anchors."""
    seen: dict[str, int] = {}
    result: set[str] = set()
    text = path.read_text(encoding="utf-8")
    for _, line in prose_lines(text, blank_code_spans=False):
        m = _HEADING.match(line)
        if m:
            slug = github_slug(m.group(2))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            result.add(slug if n == 0 else f"{slug}-{n}")
        result.update(_HTML_ID.findall(line))
    return result


def link_targets(text: str) -> list[tuple[int, str]]:
    """(line number, target) of every link and reference definition in the prose."""
    out: list[tuple[int, str]] = []
    for number, line in prose_lines(text):
        for m in _INLINE_LINK.finditer(line):
            out.append((number, m.group(1)))
        m = _REF_DEF.match(line)
        if m:
            out.append((number, m.group(1)))
    return out


def check_target(doc: Path, target: str, cache: dict[Path, set[str]]) -> str | None:
    """Why `target` (as written in `doc`) is broken, or None when it resolves."""
    target = target.strip()
    if target.startswith("<") and target.endswith(">"):
        target = target[1:-1].strip()
    if not target or _SCHEME.match(target) or target.startswith("//"):
        return None  # empty, or an absolute URL (http, https, mailto, ...): not checked
    path_part, _, anchor = target.partition("#")
    path_part = unquote(path_part.split("?", 1)[0])
    if path_part.startswith("/"):
        return "absolute path; use a path relative to the document"
    resolved = (doc.parent / path_part).resolve() if path_part else doc.resolve()
    if not resolved.exists():
        return "no such file or folder"
    if anchor and resolved.is_file() and resolved.suffix.lower() == ".md":
        if resolved not in cache:
            cache[resolved] = anchors(resolved)
        if unquote(anchor).lower() not in cache[resolved]:
            return f"no heading with anchor #{anchor}"
    return None


def find_broken(root: Path) -> list[str]:
    """One `file:line: target (reason)` line per broken relative link of the docs under root."""
    root = root.resolve()
    cache: dict[Path, set[str]] = {}
    broken: list[str] = []
    for doc in doc_files(root):
        for number, target in link_targets(doc.read_text(encoding="utf-8")):
            reason = check_target(doc, target, cache)
            if reason:
                broken.append(f"{doc.relative_to(root).as_posix()}:{number}: {target} ({reason})")
    return broken


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent,
                        help="repository root (default: this checkout)")
    args = parser.parse_args(argv)
    docs = doc_files(args.root)
    broken = find_broken(args.root)
    for line in broken:
        print(line)
    print(f"{len(docs)} documents checked, {len(broken)} broken link(s)")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
