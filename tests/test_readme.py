"""The README is a front page whose code runs: its Python block is executed, every `skinscan ...` command
in it and in docs/ parses with the real CLI, every link points at something that exists, and the
measurements in docs/ each come with the command that produces them."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from skinscan.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
SETUP_COMMANDS = (
    "pip install . && skinscan predict examples/",
    "pip install -e '.[train,test,scale]' && python -m pytest",
)


def blocks(path: Path, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", path.read_text(), flags=re.S)


def commands(path: Path) -> list[str]:
    """The shell commands of a file's bash blocks, continuation lines joined, comments dropped."""
    out = []
    for block in blocks(path, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #", 1)[0].strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def test_the_readme_is_a_front_page() -> None:
    assert len(README.read_text().splitlines()) <= 250
    bash = blocks(README, "bash")
    for command in SETUP_COMMANDS:  # the two set-up commands, exactly, each a block of its own
        assert f"{command}\n" in bash
    assert {"serving.md", "model.md", "measurements.md"} <= {p.name for p in DOCS}


def test_the_readme_python_runs() -> None:
    (code,) = blocks(README, "python")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[1] == "refer"  # examples/isic-malignant-1.jpg
    assert "bleeding: odds x" in lines[1]
    assert "disagree strongly" in lines[2]  # a cancer and a nevus given as one spot: the warning shows


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.name)
def test_every_skinscan_command_parses(path: Path) -> None:
    parser = build_parser()
    found = 0
    for line in commands(path):
        for part in line.split("&&"):
            words = shlex.split(part)
            if words[:1] == ["skinscan"]:
                found += 1
                try:
                    parser.parse_args(words[1:])
                except SystemExit:
                    pytest.fail(f"{path.name}: `{part.strip()}` does not parse")
            elif words[:1] == ["python"] and words[1].endswith(".py"):
                assert (REPO / words[1]).is_file(), f"{path.name}: {words[1]} does not exist"
    if path == README:
        assert found >= 10


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    heads = re.findall(r"^#{1,6} (.+)$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.name)
def test_every_link_resolves(path: Path) -> None:
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
        if target.startswith(("http://", "https://")):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        assert dest.exists(), f"{path.name}: {target}"
        if anchor and dest.suffix == ".md":
            assert anchor in _anchors(dest), f"{path.name}: no heading for #{anchor} in {dest.name}"


def test_every_measurement_comes_with_its_command() -> None:
    text = (REPO / "docs" / "measurements.md").read_text()
    sections = re.split(r"^## ", text, flags=re.M)[1:]
    assert len(sections) >= 6
    for section in sections:
        title = section.splitlines()[0]
        assert re.search(r"`(python benchmarks/\S+\.py|skinscan \w+)[^`]*`", section), title
