"""The docs check: README.md and docs/ name only things that exist, their `moe-cluster` command
lines parse with the real argument parser, and the configuration reference is current."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from cluster.cli import _parser
from cluster.config_reference import DOC_PATH, render

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOP = ("bench/", "cluster/", "deploy/", "docs/", "router/", "tests/", "workers/", ".ci/")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
CODE = re.compile(r"`([^`\s]+)`")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(ROOT)) for p in paths]


def test_the_configuration_reference_is_current():
    assert DOC_PATH.read_text() == render(), "docs/configuration.md is stale: run `make docs`"


def _named_paths(text: str) -> set[str]:
    """Repository paths a document names in backticks (`workers/wire/auth.py`, `tests/x.py::t`)."""
    found = set()
    for token in CODE.findall(text):
        path = token.split("::")[0].rstrip(".,:;)")
        path = re.sub(r":\d+(-\d+)?$", "", path)
        if path.startswith(TOP) and not any(c in path for c in "*<>{}$…"):
            found.add(path)
    return found


@pytest.mark.parametrize("doc", DOCS, ids=_ids(DOCS))
def test_links_and_named_paths_exist(doc: Path):
    text = doc.read_text()
    missing = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not ours to check
            continue
        resolved = (doc.parent / target).resolve()
        if not resolved.is_relative_to(ROOT):
            missing.append(f"{target} (outside the repository)")
        elif not resolved.exists():
            missing.append(target)
    missing += [p for p in sorted(_named_paths(text)) if not (ROOT / p).exists()]
    missing += [f"{t} (outside the repository)" for t in CODE.findall(text) if t.startswith("../")]
    assert not missing, f"{doc.name} names what does not exist: {missing}"


def _command_lines(text: str) -> list[str]:
    """`moe-cluster ...` lines of the fenced code blocks (continuations joined, comments cut);
    usage synopses (`[--seed N]`, `{a,b}`) are not commands and are skipped."""
    lines = []
    for block in FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            for prefix in (".venv/bin/moe-cluster ", "moe-cluster "):
                if line.startswith(prefix):
                    command = line[len(prefix) :].split(" #")[0].strip()
                    if not any(c in command for c in "[]{}|…"):
                        lines.append(command)
    return lines


@pytest.mark.parametrize("doc", DOCS, ids=_ids(DOCS))
def test_moe_cluster_command_lines_parse(doc: Path):
    bad = []
    for command in _command_lines(doc.read_text()):
        try:
            _parser().parse_args(shlex.split(command))
        except SystemExit:
            bad.append(command)
    assert not bad, f"{doc.name}: these do not parse: {bad}"
