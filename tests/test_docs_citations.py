"""The code cites the project's own docs (docs/<page>.md, optionally #<section>): every citation
must name a page that exists and a section heading it holds, so a maintainer can follow it."""

import re
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
CITATION = re.compile(r"docs/([\w.-]+\.md)(?:#([\w-]+))?")
CITING = ("scripts", "rules", "tests", "bin", "benchmarks", "deploy", "config", "profiles", "Snakefile", "test.sh")


def _slug(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _citing_files() -> list[Path]:
    files: list[Path] = []
    for name in CITING:
        path = PROJECT / name
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files += [
                p
                for p in path.rglob("*")
                if p.is_file() and p.suffix in {".py", ".smk", ".sh", ".yaml", ""} and "__pycache__" not in p.parts
            ]
    return files


def _citations() -> list[tuple[Path, str, str | None]]:
    found = []
    for path in _citing_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        found += [(path, m.group(1), m.group(2)) for m in CITATION.finditer(text)]
    return found


def test_the_code_cites_its_docs_and_nothing_outside_the_repository() -> None:
    citations = _citations()
    assert len(citations) > 20, "the code cites its docs; finding so few means the scan is broken"
    brief = "DESIGN " + "\u00a7"  # the brief outside the repository, spelled so this file does not match
    outside = [str(p) for p in _citing_files() if brief in p.read_text(encoding="utf-8", errors="replace")]
    assert outside == [], f"cites a design brief that is not in the repository: {outside}"


def test_every_cited_page_and_section_exists() -> None:
    broken = []
    for path, page, section in _citations():
        doc = PROJECT / "docs" / page
        if not doc.is_file():
            broken.append(f"{path.relative_to(PROJECT)}: docs/{page} does not exist")
            continue
        if section is None:
            continue
        anchors = {_slug(h) for h in re.findall(r"^#+ (.+)$", doc.read_text(encoding="utf-8"), re.M)}
        if section not in anchors:
            broken.append(f"{path.relative_to(PROJECT)}: docs/{page} has no section #{section}")
    assert broken == []
