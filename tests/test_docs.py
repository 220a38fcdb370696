"""The repository's documents refer only to files it contains: every ``*.md`` named in the
README, the docs, the benchmarks, the client, the server and the tests exists inside the
repository (relative to the naming file or to the repository's root); a path that leads out
of it counts as missing."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("README.md", "docs", "benchmarks", "client", "server", "tests", "roi_kernels", "docker", "deploy", ".ci")
SUFFIXES = {".md", ".py", ".h", ".cuh", ".cpp", ".cu", ".js", ".yml", ".yaml", ".toml", ""}
# A file name ending in .md, with an optional relative path, not part of a URL.
MD_REFERENCE = re.compile(r"(?<![\w/.:-])((?:\.\.?/)?(?:[\w.-]+/)*[\w.-]+\.md)\b")


def _files() -> list[Path]:
    try:
        listed = subprocess.run(["git", "ls-files", *SCANNED], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        paths = [ROOT / line for line in listed.splitlines()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: walk the folders
        paths = [p for name in SCANNED for p in ([ROOT / name] if (ROOT / name).is_file() else (ROOT / name).rglob("*"))]
    return [p for p in paths if p.is_file() and p.suffix in SUFFIXES and "node_modules" not in p.parts]


def _inside(path: Path) -> bool:
    return path.is_file() and path.is_relative_to(ROOT)


def test_every_markdown_file_named_exists():
    missing = []
    for path in _files():
        text = path.read_text(errors="replace")
        for found in MD_REFERENCE.finditer(text):
            name = found.group(1)
            if not any(_inside((base / name).resolve()) for base in (path.parent, ROOT)):
                line = text.count("\n", 0, found.start()) + 1
                missing.append(f"{path.relative_to(ROOT)}:{line}: {name}")
    assert not missing, "references to files the repository does not contain:\n" + "\n".join(missing)

