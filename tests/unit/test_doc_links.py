"""Every relative link in README.md, CHANGELOG.md and docs/ resolves: the file exists and, for ``#anchor``, a
heading of that file makes that anchor (GitHub's rules). So does every alert's ``runbook_url``. And the first
contact (issue 27): the README's first screen, its configuration, operations.md's contents, LICENSE, CHANGELOG.md.

Links to other sites are not followed (no network in the unit tier).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

from rabbitproxy import config as config_mod

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted([ROOT / "README.md", ROOT / "CHANGELOG.md", *(ROOT / "docs").glob("*.md")])
# [text](target) and [text](target "title"); images too. Reference-style links are not used in these files.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def prose(path: Path) -> list[str]:
    """The file's lines outside fenced code blocks, where a '#' is a comment and '[x](y)' is code."""
    lines, fenced = [], False
    for line in path.read_text().splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = text.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in prose(path):
        m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def relative_links(path: Path) -> list[str]:
    found = []
    for line in prose(path):
        # Inline code is not a link either.
        for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):
                found.append(target)
    return found


# Written on another branch of issue 27 (i27a) that is merged beside this one: a link to it may wait for it, but
# only while the file is missing; once it exists it is checked like any other. Remove after the merge.
ELSEWHERE = {ROOT / "docs" / "migrating.md"}


def check(source: Path, target: str) -> str | None:
    """None when ``target`` (relative to ``source``) resolves, else why not."""
    file_part, _, anchor = target.partition("#")
    dest = (source.parent / file_part).resolve() if file_part else source
    if not dest.exists() and dest in ELSEWHERE and not anchor:
        return None
    if not dest.exists():
        return f"{source.relative_to(ROOT)}: {target}: no such file"
    if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
        return f"{source.relative_to(ROOT)}: {target}: no heading makes #{anchor}"
    return None


def test_the_slug_rules_match_githubs() -> None:
    assert slug("RabbitMQ node monitor: `[services.rabbitmq]`") == "rabbitmq-node-monitor-servicesrabbitmq"
    assert slug("Limits, slow and hostile clients") == "limits-slow-and-hostile-clients"
    assert slug('AMQP handshake: `protocol` and `client_idle_timeout = "auto"`') == (
        "amqp-handshake-protocol-and-client_idle_timeout--auto"
    )


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path: Path) -> None:
    assert path.exists(), path
    links = relative_links(path)
    broken = [why for t in links if (why := check(path, t))]
    assert not broken, "\n".join(broken)


def test_the_readme_links_the_docs() -> None:
    # A check that found no link at all would pass whatever the files say.
    assert len(relative_links(ROOT / "README.md")) >= 5


def test_every_alert_has_a_runbook_that_exists() -> None:
    rules = yaml.safe_load((ROOT / "examples" / "prometheus" / "alerts.yml").read_text())
    alerts = [r for g in rules["groups"] for r in g["rules"] if "alert" in r]
    assert alerts
    for rule in alerts:
        url = rule["annotations"].get("runbook_url", "")
        assert url.startswith("docs/operations.md#"), rule["alert"]
        assert check(ROOT / "README.md", url) is None, (rule["alert"], url)
        # Each alert has an entry of its own, named after it.
        assert url.endswith("#" + slug(rule["alert"])), (rule["alert"], url)


def test_the_readme_starts_with_what_a_newcomer_needs() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    first = "\n".join(lines[:40])
    # The two set-up commands, under the heading the pre-commit hook looks for, within the first screen.
    assert "## Quick start" in first
    assert "scripts/demo" in first and "scripts/test" in first
    # ... and the warning that installing rabbitmq-server starts a broker of its own, with what to do.
    assert "5672" in first and "systemctl disable --now rabbitmq-server" in first
    text = "\n".join(lines)
    assert "docs/migrating.md" in text and "LICENSE" in text and "CHANGELOG.md" in text
    # The configuration shown is at most ten lines (docs/configuration.md has the rest); the next test loads it.
    toml = text.split("```toml\n", 1)[1].split("```", 1)[0]
    assert len(toml.strip().splitlines()) <= 10


def test_the_readme_configuration_is_valid() -> None:
    toml = (ROOT / "README.md").read_text().split("```toml\n", 1)[1].split("```", 1)[0]
    cfg = config_mod.validate(tomllib.loads(toml), "README.md")
    assert cfg.services[0].rabbitmq is not None and len(cfg.services[0].backends) == 3


def test_operations_md_has_a_table_of_contents_naming_every_section() -> None:
    path = ROOT / "docs" / "operations.md"
    head = path.read_text().split("\n## ", 1)[0]
    sections = [slug(line[3:]) for line in prose(path) if line.startswith("## ")]
    assert sections
    for anchor in sections:
        assert f"(#{anchor})" in head, anchor


def test_the_license_is_the_apache_license_pyproject_names() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_the_changelog_keeps_an_unreleased_section() -> None:
    text = (ROOT / "CHANGELOG.md").read_text()
    assert "keepachangelog.com" in text
    assert "\n## [Unreleased]\n" in text
