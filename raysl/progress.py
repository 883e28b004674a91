"""Progress bars (tqdm) for long raysl steps: a live bar on a terminal; on a pipe, a log file
or a Ray worker's output, tqdm's status as plain lines, one at most every `PLAIN_EVERY_S`
seconds and one at the end."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

PLAIN_EVERY_S = 10.0


class _Lines:
    """A stream for tqdm that turns its carriage-return redraws into one line per update."""

    def __init__(self, stream):
        self.stream = stream
        self.encoding = getattr(stream, "encoding", "utf-8")

    def write(self, text: str) -> None:
        text = text.replace("\r", "").rstrip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def bar(total: int | None, desc: str | None, unit: str = "img", *, file=None, disable: bool = False) -> tqdm:
    """A tqdm bar on `file` (default stderr, so stdout keeps only results). Callers update
    postfixes with `refresh=False`, so plain lines keep their pace."""
    file = file or sys.stderr
    if getattr(file, "isatty", lambda: False)():
        return tqdm(total=total, desc=desc, unit=unit, file=file, dynamic_ncols=True, disable=disable)
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        file=_Lines(file),
        mininterval=PLAIN_EVERY_S,
        disable=disable,
        bar_format="{desc}: {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}, {rate_fmt}{postfix}]",
    )
