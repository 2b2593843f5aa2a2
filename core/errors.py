"""The one exception type users see.

Every failure a user can cause or fix (bad input, missing backend, corrupt program file, a
backend that cannot lower a partition) is a :class:`HandoffError` whose message is one line:
what, where, and the next step. The CLI prints it without a traceback unless ``--debug``.
"""

from __future__ import annotations


class HandoffError(Exception):
    """A failure with a one-line, user-facing message."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class ProgramFormatError(HandoffError):
    """A program file that is truncated, garbled, hostile or of another format version.

    :param field: the header or manifest field that is wrong.
    :param offset: the byte offset in the file where it was read.
    """

    def __init__(self, path: str, field: str, offset: int, problem: str):
        self.path, self.field, self.offset = path, field, offset
        super().__init__(f"{path}: invalid program file: {field} at offset {offset}: {problem}")


def one_line(exc: BaseException | str, limit: int = 400) -> str:
    """``exc`` as one line for a message: ``Type: text`` with whitespace collapsed and cut at
    ``limit`` characters (a :class:`HandoffError`'s text, or a string, alone). The one formatter
    every part of handoff, and every plugin, uses for a caught exception or a vendor's message."""
    text = " ".join(str(exc).split())
    if isinstance(exc, BaseException) and not isinstance(exc, HandoffError):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class FallbackWarning(UserWarning):
    """A program loaded, but some delegates run their fallback copies (format 1.3) because their
    own backend is not installed, not available here, or failed to load their blob. One per
    :func:`handoff.load`; ``strict=True`` (``handoff run --strict``) refuses instead."""
