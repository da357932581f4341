"""A byte cursor that turns fuzzer bytes into structured choices.

Why not atheris.FuzzedDataProvider: the targets must also run without atheris (the
random engine, the CI smoke test, regression tests replaying a saved input). The
cursor never fails: once the bytes run out every choice is its lowest value (the
first of a list, False), so any input, however short, maps to one well-defined
structured input, and the shortest inputs are the well-formed, common ones.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


class Cursor:
    def __init__(self, data: builtins.bytes) -> None:
        self.data = data
        self.pos = 0

    @property
    def left(self) -> builtins.int:
        return len(self.data) - self.pos

    def byte(self) -> builtins.int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def int(self, lo: builtins.int, hi: builtins.int) -> builtins.int:
        """An integer in [lo, hi] (inclusive), from as few bytes as the range needs."""
        span = hi - lo
        if span <= 0:
            return lo
        value, width = 0, 0
        while (1 << width) <= span:
            value = (value << 8) | self.byte()
            width += 8
        return lo + value % (span + 1)

    def bool(self) -> builtins.bool:
        return self.byte() & 1 == 1

    def chance(self, of: builtins.int) -> builtins.bool:
        """True about once in ``of`` draws; False once the bytes ran out (the usual path)."""
        return self.byte() % of == of - 1

    def bytes(self, n: builtins.int) -> builtins.bytes:
        chunk = self.data[self.pos : self.pos + n]
        self.pos += len(chunk)
        return chunk

    def blob(self, max_len: builtins.int) -> builtins.bytes:
        return self.bytes(self.int(0, max_len))

    def pick(self, choices: Sequence[T]) -> T:
        return choices[self.int(0, len(choices) - 1)]

    def rest(self) -> builtins.bytes:
        chunk = self.data[self.pos :]
        self.pos = len(self.data)
        return chunk
