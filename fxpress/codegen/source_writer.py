"""Indented Python source, a line at a time: how the wrapper and the kernel emitters write code."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


class SourceWriter:
    def __init__(self, level: int = 0) -> None:
        self.lines: list[str] = []
        self.level = level

    def line(self, text: str = "") -> None:
        self.lines.append("    " * self.level + text if text else "")

    @contextmanager
    def indented(self) -> Iterator[None]:
        self.level += 1
        try:
            yield
        finally:
            self.level -= 1

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"
