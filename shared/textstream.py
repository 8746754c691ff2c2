"""Streaming detokenization: emit text as tokens arrive without splitting characters."""

from __future__ import annotations

from collections.abc import Callable


class IncrementalDetokenizer:
    """Decodes the growing token list and returns only the new text each time.

    Byte-level tokenizers can end a step in the middle of a UTF-8 character
    (decoded as U+FFFD); such a tail is held back until the next token completes it.
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._emitted = ""

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self._decode(self._ids)
        if text.endswith("\ufffd"):
            return ""
        return self._take(text)

    def flush(self) -> str:
        return self._take(self._decode(self._ids)) if self._ids else ""

    def _take(self, text: str) -> str:
        if text.startswith(self._emitted):
            delta = text[len(self._emitted) :]
        else:  # the tokenizer re-spaced earlier text; send only what is beyond it
            delta = text[len(self._emitted) :] if len(text) > len(self._emitted) else ""
        self._emitted = text
        return delta

    @property
    def text(self) -> str:
        return self._emitted
