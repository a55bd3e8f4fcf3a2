"""docs/design.md stays the contract as built: every method of the daemon's
table and every key of ``wksd.keys`` is in it, and no link of the docs is dead."""

from __future__ import annotations

import inspect
import re
import types
import typing
from collections.abc import Iterator
from pathlib import Path

import pytest

from wksd.app import Daemon
from wksd.config import Config
from wksd.keys import KeySpace

ROOT = Path(__file__).resolve().parent.parent
DESIGN = ROOT / "docs" / "design.md"
#: The Markdown files whose relative links must resolve.
LINKED_DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])

#: Stands in for an identifier when a key is built, then becomes a placeholder
#: pattern: the document writes ``wks:session:{userId}``.
_HOLE = "\x00"
_PLACEHOLDER = r"\{[A-Za-z_]+\}"

#: ``[text](target)``, the target up to a space or the closing parenthesis.
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_FENCE = re.compile(r"^\s*(```|~~~)")
#: A link with a scheme (https:, mailto:, file:) is not a path in the repository.
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*:")
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")


def prose_lines(path: Path) -> Iterator[str]:
    """The lines of a Markdown file outside its fenced code blocks."""
    fenced = False
    for line in path.read_text().splitlines():
        if _FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            yield line


def anchors(path: Path) -> set[str]:
    """The heading anchors GitHub gives a Markdown file."""
    found: set[str] = set()
    for line in prose_lines(path):
        match = _HEADING.match(line)
        if match is None:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).lower()).replace(" ", "-")
        anchor, n = slug, 0
        while anchor in found:  # GitHub numbers repeated headings
            n += 1
            anchor = f"{slug}-{n}"
        found.add(anchor)
    return found


def links(path: Path) -> Iterator[str]:
    """Every link target in the prose of a Markdown file."""
    for line in prose_lines(path):
        yield from _LINK.findall(line)


def key_patterns() -> dict[str, str]:
    """Each key or channel ``KeySpace`` spells, as a regex with placeholders
    where an identifier goes, by the member that spells it."""
    keys = KeySpace()
    patterns: dict[str, str] = {}
    for name, member in vars(KeySpace).items():
        if name.startswith("_"):
            continue
        if isinstance(member, property):
            spelled = [getattr(keys, name)]
        elif isinstance(member, types.FunctionType):
            spelled = [getattr(keys, name)(_HOLE)]
            hints = typing.get_type_hints(member)
            parameters = list(inspect.signature(member).parameters)[1:]
            if any(type(None) in typing.get_args(hints[p]) for p in parameters):
                spelled.append(getattr(keys, name)(None))
        else:
            continue
        for index, key in enumerate(spelled):
            pattern = _PLACEHOLDER.join(re.escape(part) for part in key.split(_HOLE))
            patterns[f"{name}#{index}"] = pattern
    return patterns


def test_every_method_is_in_the_design() -> None:
    """Each method of the daemon's table is named in docs/design.md."""
    methods = Daemon(Config()).dispatcher.methods
    text = DESIGN.read_text()
    assert len(methods) > 20  # the table was read, not an empty stand-in
    assert [name for name in sorted(methods) if f"`{name}`" not in text] == []


def test_every_key_is_in_the_design() -> None:
    """Each key and channel of wksd.keys is spelled in docs/design.md."""
    text = DESIGN.read_text()
    patterns = key_patterns()
    assert "session#0" in patterns and "events#1" in patterns  # holes and None found
    missing = [name for name, pattern in patterns.items() if not re.search(f"`{pattern}", text)]
    assert missing == []


def test_key_patterns_name_the_hole() -> None:
    """A key built from an identifier becomes a pattern with a placeholder there."""
    assert re.fullmatch(key_patterns()["session#0"], "wks:session:{userId}")
    assert not re.fullmatch(key_patterns()["session#0"], "wks:session:")


def is_dead(doc: Path, target: str) -> bool:
    """Whether a relative link of ``doc`` misses: outside the repository, no such
    file, or no such heading in a Markdown file."""
    path_part, _, fragment = target.partition("#")
    resolved = (doc.parent / path_part).resolve() if path_part else doc
    if resolved != ROOT and ROOT not in resolved.parents:
        return True
    if not resolved.exists():
        return True
    return bool(fragment) and resolved.suffix == ".md" and fragment not in anchors(resolved)


@pytest.mark.parametrize("doc", LINKED_DOCS, ids=lambda path: path.name)
def test_relative_links_resolve(doc: Path) -> None:
    """Each relative link of the README and docs/ names a file (and heading) in the repository."""
    relative = [target for target in links(doc) if not _SCHEME.match(target)]
    assert [target for target in relative if is_dead(doc, target)] == []


def test_a_link_out_of_the_repository_is_dead() -> None:
    """A link that leaves the checkout (as ../shared/DESIGN.md did) counts as dead."""
    readme = ROOT / "README.md"
    assert is_dead(readme, "../shared/DESIGN.md")
    assert is_dead(readme, "docs/design.md#no-such-heading")
    assert not is_dead(readme, "docs/design.md#10-source-map")


def test_anchors_follow_github(tmp_path: Path) -> None:
    """Heading anchors are GitHub's: punctuation dropped, repeats numbered, code skipped."""
    doc = tmp_path / "doc.md"
    doc.write_text("# The seed's app: keys\n\n```sh\n# a comment\n```\n\n## The seed's app: keys\n")
    assert anchors(doc) == {"the-seeds-app-keys", "the-seeds-app-keys-1"}
