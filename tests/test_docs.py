"""The documents stay true to the tree: docs/design.md lists every module under dlm/ (and no module
that is gone), every relative link in the documents points to a file that exists and, for an
#anchor into a .md file, to one of its headings (GitHub's slugs), and every section a file names in
words (`docs/results.md ("Scaling")`) is a heading of that document. Nothing is executed."""

import json
import re
from pathlib import Path

import pytest

from tests.conftest import ROOT

LINKING_DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
                     ROOT / "benchmarks" / "README.md", ROOT / "reports" / "README.md"]
FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
INLINE_CODE = re.compile(r"`[^`\n]*`")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def prose_lines(text: str) -> list[str]:
    """The lines of a markdown text outside fenced code blocks (fences may be indented in lists)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def headings(path: Path) -> list[str]:
    return [match.group(2) for line in prose_lines(path.read_text()) if (match := HEADING.match(line))]


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text lowercased, punctuation other than '-' and '_' dropped,
    spaces made '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading anchors by its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's slug, a repeated one numbered -1, -2, ... as GitHub does."""
    found, seen = set(), {}
    for heading in headings(path):
        slug = github_slug(heading)
        found.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return found


def relative_links(path: Path) -> list[str]:
    """Link targets in the prose of a markdown file, not inside code, without a URL scheme."""
    targets = []
    for line in prose_lines(path.read_text()):
        for target in LINK.findall(INLINE_CODE.sub("", line)):
            if not re.match(r"[a-z][a-z0-9+.-]*:", target):
                targets.append(target)
    return targets


def broken_link(document: Path, target: str) -> str | None:
    """Why `target`, linked from `document`, does not resolve; None when it does."""
    path_part, _, anchor = target.partition("#")
    linked = (document.parent / path_part).resolve() if path_part else document
    if not linked.exists():
        return f"{target}: no file {linked.relative_to(ROOT) if linked.is_relative_to(ROOT) else linked}"
    if anchor and linked.suffix == ".md" and anchor not in anchors(linked):
        return f"{target}: no heading of {linked.name} has the anchor #{anchor}"
    return None


@pytest.mark.parametrize("document", LINKING_DOCUMENTS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_relative_link_resolves(document):
    broken = [why for target in relative_links(document) if (why := broken_link(document, target))]
    assert not broken, f"{document.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_link_check_reads_github_anchors_and_catches_a_broken_one(tmp_path):
    (tmp_path / "a.md").write_text(
        "# Title\n\n## Ablations at equal CPU budget (`benchmarks/quality.py`)\n\n## The seed's collapse, reproduced\n"
        "## Notes\n## Notes\n\n```bash\n# not a heading\n```\n")
    (tmp_path / "b.md").write_text(
        "[ok](a.md#ablations-at-equal-cpu-budget-benchmarksqualitypy) [ok](a.md#the-seeds-collapse-reproduced)"
        " [ok](a.md#notes-1) [ok](#here) [web](https://example.org/x.md#nothing) `[code](gone.md)`\n"
        "## Here\n[gone](c.md) [no anchor](a.md#not-a-heading) [fenced](a.md#not-a-heading-1)\n")
    document = tmp_path / "b.md"
    assert relative_links(document) == [
        "a.md#ablations-at-equal-cpu-budget-benchmarksqualitypy", "a.md#the-seeds-collapse-reproduced",
        "a.md#notes-1", "#here", "c.md", "a.md#not-a-heading", "a.md#not-a-heading-1"]
    broken = [target for target in relative_links(document) if broken_link(document, target)]
    assert broken == ["c.md", "a.md#not-a-heading", "a.md#not-a-heading-1"]


def module_names() -> set[str]:
    """Every module of the package by its dotted name; a package's __init__ counts where it holds code."""
    names = set()
    for path in (ROOT / "dlm").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            if not path.read_text().strip():
                continue
            parts = parts[:-1]
        names.add(".".join(parts))
    return names


def design_module_lines() -> set[str]:
    """The modules docs/design.md lists: '- `dlm.x.y`: ...' lines of its Modules section."""
    text = (ROOT / "docs" / "design.md").read_text()
    section = re.search(r"^### Modules\n(.*?)(?=^#{1,3} )", text, re.S | re.M)
    assert section, "docs/design.md has no '### Modules' section"
    return set(re.findall(r"^- `(dlm(?:\.\w+)*)`:", section.group(1), re.M))


def test_design_lists_every_module_under_dlm():
    modules, listed = module_names(), design_module_lines()
    assert {"dlm.cli", "dlm.core.config", "dlm.families", "dlm.evaluation.matched"} <= modules
    assert not modules - listed, f"missing from docs/design.md's Modules section: {sorted(modules - listed)}"
    assert not listed - modules, f"docs/design.md lists modules that do not exist: {sorted(listed - modules)}"


SECTION_MENTION = re.compile(r"\b(\w+)\.md(?:,\s*|\s*\(\s*|\s+)((?:\"[^\"]+\"(?:,\s*)?)+)")
MENTIONING_FILES = [
    *LINKING_DOCUMENTS, *sorted((ROOT / "params").glob("*.yaml")), *sorted((ROOT / "dlm").rglob("*.py")),
    *sorted((ROOT / "benchmarks").glob("*.py")), *sorted((ROOT / "notebooks").glob("*.ipynb")),
    *sorted(path for path in (ROOT / "tests").glob("*.py") if path.name != "test_docs.py"),
]


def flatten(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"\n\s*#\s*", " ", text))


def flat_text(path: Path) -> str:
    """A file's text with comment continuations joined and whitespace collapsed, so a quoted section
    name broken over two lines reads as one; a notebook's cells' sources."""
    text = path.read_text()
    if path.suffix == ".ipynb":
        text = "\n".join("".join(cell["source"]) for cell in json.loads(text)["cells"])
    return flatten(text)


def section_mentions(text: str) -> list[tuple[str, str]]:
    """(document stem, section name) for each `NAME.md ("Section", ...)` or `NAME.md, "Section"`."""
    return [(stem, name) for stem, names in SECTION_MENTION.findall(text) for name in re.findall(r"\"([^\"]+)\"", names)]


def test_section_mentions_are_read_in_every_form():
    text = flatten('x (docs/results.md, "Where things\n    stand") y docs/journal.md ("Scaling", "Block diffusion").\n'
                        '# docs/usage.md,\n# "Control"; results.md "Families side by side" and README.md')
    assert section_mentions(text) == [("results", "Where things stand"), ("journal", "Scaling"),
                                      ("journal", "Block diffusion"), ("usage", "Control"),
                                      ("results", "Families side by side")]


def named_section_missing(stem: str, name: str) -> bool:
    document = ROOT / "docs" / f"{stem}.md"
    if not document.exists():
        return False  # another file's name (README.md, a benchmark table): not a docs/ section
    return not any(heading.lower().startswith(name.lower()) for heading in headings(document))


@pytest.mark.parametrize("path", MENTIONING_FILES, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_section_named_in_words_exists(path):
    missing = [f"{stem}.md \"{name}\"" for stem, name in section_mentions(flat_text(path))
               if named_section_missing(stem, name)]
    assert not missing, f"{path.relative_to(ROOT)} names sections no heading of docs/ starts with: {missing}"


# --- README's preset table: every preset exists, every time is measured, every quality is results.md's -----

def preset_table() -> list[dict[str, str]]:
    lines = (ROOT / "README.md").read_text().split("## Presets", 1)[1].split("\n## ", 1)[0].splitlines()
    rows = [line for line in lines if line.startswith("| `")]
    header = next(line for line in lines if line.startswith("| preset"))
    names = [cell.strip() for cell in header.strip("|").split("|")]
    return [dict(zip(names, (cell.strip() for cell in row.strip("|").split("|")))) for row in rows]


def test_every_preset_in_the_readme_table_exists_and_every_time_was_measured():
    import pandas as pd

    times = pd.read_csv(ROOT / "benchmarks" / "results" / "preset_times.csv")
    results = (ROOT / "docs" / "results.md").read_text()
    table = preset_table()
    assert len(table) >= 5
    for row in table:
        preset = row["preset"].strip("`")
        assert (ROOT / "params" / preset).is_file(), preset
        measured = times[times["preset"] == preset]
        if row["training"] == "not measured yet":
            assert measured.empty, f"{preset}: preset_times.csv has a time the README does not give"
            continue
        match = re.match(r"([\d.]+) min \(([\w ]+)\)", row["training"])
        assert match, row["training"]
        assert ((measured["train_min"] == float(match[1])) & (measured["precision"] == match[2])).any(), (
            f"{preset}: {row['training']} is not a row of benchmarks/results/preset_times.csv")
        quality = re.match(r"[\d.]+", row["quality (x held-out)"])
        if quality:  # a multiple of held-out text's perplexity, as docs/results.md gives it
            assert re.search(rf"\| \**{re.escape(quality[0])}\** \|", results), f"{preset}: {quality[0]}"
