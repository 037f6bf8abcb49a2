"""argparse types for the command line: a bad value is an error naming the fix, never a silent default."""
from __future__ import annotations

import argparse
from typing import Callable


def whole_number(minimum: int) -> Callable[[str], int]:
    """A type accepting whole numbers >= `minimum`."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
        if n < minimum:
            raise argparse.ArgumentTypeError(f"{n}: give {minimum} or more")
        return n
    return parse


__all__ = ["whole_number"]
