"""`AV`: one value per modality (video, audio), so a step is written once for both streams."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")
U = TypeVar("U")


@dataclass(frozen=True)
class AV(Generic[T]):
    video: T
    audio: T

    def map(self, fn: Callable[[T], U]) -> "AV[U]":
        return AV(fn(self.video), fn(self.audio))

    def zip(self, other: "AV", fn: Callable[[T, object], U]) -> "AV[U]":
        return AV(fn(self.video, other.video), fn(self.audio, other.audio))

    def __iter__(self) -> Iterator[T]:  # `v, a = pair`
        yield self.video
        yield self.audio

    @staticmethod
    def both(x: T) -> "AV[T]":
        return AV(x, x)


__all__ = ["AV"]
