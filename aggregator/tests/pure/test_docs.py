"""The documentation: links that resolve, a README that stays a user's page, feature pages that cover the code."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from aggregator.schema import anchor

REPO = Path(__file__).resolve().parents[3]
USER_PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PAGES = [*USER_PAGES, REPO / "CHANGELOG.md", *sorted((REPO / "docs" / "development").glob("*.md")),
         *sorted((REPO / "setup").rglob("README.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def prose(text: str) -> str:
    """The text without fenced code blocks and code spans, where brackets are not links."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings, numbered as GitHub numbers repeated ones."""
    seen: dict[str, int] = {}
    for line in re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M).splitlines():
        if re.match(r"#{1,6} ", line):
            slug = anchor(line.lstrip("#"))
            seen[slug] = seen.get(slug, -1) + 1
            if seen[slug]:
                seen[f"{slug}-{seen[slug]}"] = 0
    return set(seen)


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in LINK.findall(prose(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        path, _, fragment = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest}")
        elif fragment and (dest.suffix != ".md" or fragment not in anchors(dest)):
            broken.append(f"{target}: no heading #{fragment} in {dest.name}")
    return broken


def test_anchors_are_made_as_github_makes_them() -> None:
    assert anchor(" Replacing pulquero's BatteryAggregator") == "replacing-pulqueros-batteryaggregator"
    assert anchor(" `dispatcher.batteries[]`") == "dispatcherbatteries"
    assert anchor(" `energy.members.<key>`") == "energymemberskey"
    assert anchor(" On D-Bus, and the monthly metering") == "on-d-bus-and-the-monthly-metering"


def test_the_link_check_finds_a_missing_file_and_a_missing_heading(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("# A\n\n## Install on a GX\n\n## Notes\n\n## Notes\n")
    page = tmp_path / "b.md"
    page.write_text("[ok](a.md#install-on-a-gx) [second](a.md#notes-1) [self](#b) `[code](nowhere.md)`\n"
                    "```\n[block](nowhere.md)\n```\n[file](gone.md) [heading](a.md#uninstall) "
                    "![img](pic.png) [web](https://example.com/x#y)\n# B\n")
    assert [b.split(":")[0] for b in broken_links(page)] == ["gone.md", "a.md#uninstall", "pic.png"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_points_to_an_existing_file_and_heading(page: Path) -> None:
    assert not broken_links(page)


def test_the_readme_is_a_users_page() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.encode()) <= 10 * 1024, "README.md grew beyond 10 KB: move details into docs/"
    headings = [line for line in readme.splitlines() if line.startswith("## ")]
    assert headings[0] == "## Install on a GX", "installing comes first"
    for words in ("System setup → Battery monitor", "DVCC", "Controlling BMS", "--replace-batteryaggregator",
                  "check_config.sh", "/var/log/battery-aggregator"):
        assert words in readme, words
    development = readme[readme.index("## Development"):]
    assert "./run.sh demo" in development and "./run.sh test" in development
    assert "./run.sh test" in (REPO / ".ci" / "run").read_text()


@pytest.mark.parametrize("page", USER_PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_user_pages_hold_no_development_evidence(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    for pattern in (r"\btest_\w+", r"issue #\d", r"\(was\b", r"\bwithdrawn\b", r"\bbefore this round\b"):
        assert not re.search(pattern, text), f"{page.name}: {pattern}"


def test_code_comments_and_docs_name_no_issue_numbers() -> None:
    """A comment says why a rule is, not which issue asked for it: the tracker's numbers mean nothing to a reader
    of the code or of the docs."""
    pattern = re.compile(r"\b[Ii]ssues? #?\d+|\(#\d+\)")
    found = []
    for folder in ("aggregator", "aggregator_dev", "bench", "setup", "docs", "config_generator"):
        for path in sorted((REPO / folder).rglob("*")):
            if path.suffix not in {".py", ".sh", ".md", ".html", ".toml"} or not path.is_file():
                continue
            for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                if pattern.search(line):
                    found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()[:100]}")
    assert not found, "\n".join(found)


def test_the_feature_pages_cover_every_aggregate_path_and_config_key() -> None:
    from aggregator.config import Config
    from aggregator.battery.merge import RULES

    paths_page = (REPO / "docs" / "aggregated-battery.md").read_text(encoding="utf-8")
    missing_paths = [p for p in RULES if f"`{p}`" not in paths_page and f"{p}`" not in paths_page]
    assert not missing_paths, missing_paths
    reference = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert not [k for k in Config.model_fields if f"| `{k}` |" not in reference]
