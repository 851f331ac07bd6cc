"""The README's code blocks, by section: what tests/test_readme.py and tests/test_cluster_path.py run."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def blocks(language: str | None = None) -> list[tuple[str, str, str]]:
    """(section heading, language, code) of every fenced block, in order."""
    found, section = [], ""
    lines = README.read_text().splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("## "):
            section = lines[i][3:].strip()
        fence = re.match(r"^```(\w*)$", lines[i])
        if fence:
            end = lines.index("```", i + 1)
            if language is None or fence.group(1) == language:
                found.append((section, fence.group(1), "\n".join(lines[i + 1:end])))
            i = end
        i += 1
    return found


def commands(section: str) -> list[list[str]]:
    """The shell commands of a section's bash blocks as argument lists: continuation lines joined, comments
    dropped, `&&` chains split, a trailing `&` dropped."""
    out = []
    for where, _, code in blocks("bash"):
        if where != section:
            continue
        for line in code.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            if tokens and tokens[-1] == "&":
                tokens = tokens[:-1]
            part = []
            for token in tokens + ["&&"]:
                if token == "&&":
                    if part:
                        out.append(part)
                    part = []
                else:
                    part.append(token)
    return out


def sections() -> list[str]:
    return [line[3:].strip() for line in README.read_text().splitlines() if line.startswith("## ")]
