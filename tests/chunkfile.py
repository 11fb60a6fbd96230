"""Chunked case files (as starlark-go's `chunkedfile`): many small cases in one file.

A chunk starts at a line `-- NAME --` and runs to the next such line or the end of the file;
lines before the first chunk are the file's own comments. Chunk text is kept byte for byte
(newlines are not translated), so formatter and CRLF cases survive.
"""

from __future__ import annotations

import re
from pathlib import Path

HEADER = re.compile(r"^-- (\S+) --$")


def read_chunks(path: Path) -> dict[str, str]:
    chunks: dict[str, list[str]] = {}
    current = None
    lines = path.read_bytes().decode("utf-8").split("\n")
    if lines[-1] == "":  # the newline that ends the file starts no line
        lines.pop()
    for line in lines:
        m = HEADER.match(line)
        if m:
            current = m.group(1)
            assert current not in chunks, f"{path}: chunk {current} twice"
            chunks[current] = []
        elif current is not None:
            chunks[current].append(line + "\n")
    return {name: "".join(lines) for name, lines in chunks.items()}


def write_chunks(path: Path, chunks: dict[str, str], comment: str = "") -> None:
    """The inverse of read_chunks (every chunk ends with a newline or is empty)."""
    parts = [comment]
    for name, text in chunks.items():
        assert text == "" or text.endswith("\n"), name
        parts.append(f"-- {name} --\n{text}")
    path.write_bytes("".join(parts).encode("utf-8"))


class Case:
    """One recipe case: a file of its own, or a chunk of a `.chunks` file."""

    def __init__(self, name: str, path: Path, text: str | None = None):
        self.name, self.path, self._text = name, path, text

    def file(self, folder: Path) -> Path:
        """A path holding the case: its own file, or the chunk written into `folder`."""
        if self._text is None:
            return self.path
        out = folder / self.name
        out.write_bytes(self._text.encode("utf-8"))
        return out

    def __repr__(self) -> str:
        return self.name


def cases(folder: Path, pattern: str = "*.kmx") -> list[Case]:
    """Every `pattern` file of `folder` and every chunk of its `.chunks` files, by name."""
    found = [Case(p.name, p) for p in folder.glob(pattern)]
    for chunked in folder.glob("*.chunks"):
        found += [Case(name, chunked, text) for name, text in read_chunks(chunked).items()]
    return sorted(found, key=lambda c: c.name)
