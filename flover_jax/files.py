"""The files front ends read and write: JSON Lines in, results out, nothing read wrongly or lost.

Reading (prompts files, traces): a file splits into lines at "\\n" only, so a raw U+2028
or U+2029 inside a JSON string stays text, as JSON allows (`str.splitlines` would cut the
record in two), and "\\r\\n" ends a line too; a UTF-8 byte-order mark at the start is
skipped; a line that is not UTF-8 or not JSON becomes that line's own error, and the others
are read as usual; blank lines are skipped.

Writing (`--output`, `--output_json`): the target is checked before any work, since a
failure after the run loses every result: "-" is stdout; a path that is one of the inputs
(however spelled: the same file on disk) is refused; the target must take a write now (a
zero-byte write, which a read-only mount, an immutable file, /dev/full and /proc refuse).
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TextIO


@dataclasses.dataclass(frozen=True)
class Line:
    """One non-blank line of a JSON Lines file: its JSON value, or why it has none."""

    number: int  # 1-based, blank lines counted
    value: object = None  # the parsed JSON, when error is None
    error: str | None = None  # "not UTF-8 (...)" or "not JSON (...)"


def read_jsonl(flag: str, path: str | Path) -> list[Line]:
    """The non-blank lines of a JSON Lines file; ValueError naming `flag` if it cannot be read."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{flag}={str(path)!r}: {e.strerror or e}") from None
    data = data.removeprefix(codecs.BOM_UTF8)
    lines = []
    for number, raw in enumerate(data.split(b"\n"), 1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            lines.append(Line(number, error=f"not UTF-8 (byte {raw[e.start]:#04x} at column "
                                            f"{e.start + 1})"))
            continue
        if not text.strip():
            continue
        try:
            lines.append(Line(number, json.loads(text)))
        except json.JSONDecodeError as e:
            lines.append(Line(number, error=f"not JSON ({e.msg}, column {e.colno})"))
        except (ValueError, RecursionError) as e:  # a 5,000-digit int, arrays nested too deep
            lines.append(Line(number, error=f"not JSON ({type(e).__name__}: {e})"))
    return lines


@dataclasses.dataclass(frozen=True)
class Output:
    """Where a mode writes its results: a checked file path, or stdout (path None)."""

    flag: str
    path: str | None

    @contextlib.contextmanager
    def open(self) -> Iterator[TextIO]:
        if self.path is None:
            yield sys.stdout
            sys.stdout.flush()
            return
        try:
            with open(self.path, "w", encoding="utf-8") as file:
                yield file
        except OSError as e:
            raise ValueError(f"{self.flag}={self.path!r}: cannot be written ({e.strerror or e})") from None


def output(flag: str, value: str | None, inputs: Sequence[tuple[str, str | None]] = ()) -> Output:
    """Check an output flag before any work. `inputs` are (flag, path) of the files the mode
    reads: writing over one of them is refused."""
    if value is None or value == "-":
        return Output(flag, None)
    if not value:
        raise ValueError(f"{flag}='': empty; give a file path, or '-' for stdout")
    path = Path(value)
    for input_flag, input_value in inputs:
        if input_value and _same_file(path, Path(input_value)):
            raise ValueError(f"{flag}={value!r}: is the input {input_flag}={input_value!r}; "
                             "writing there would replace it (give another path)")
    if path.is_dir():
        raise ValueError(f"{flag}={value!r}: is a directory")
    parent = path.absolute().parent
    if not parent.is_dir():
        raise ValueError(f"{flag}={value!r}: directory {str(parent)!r} does not exist")
    existed = os.path.lexists(path)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(descriptor, b"")
        finally:
            os.close(descriptor)
    except OSError as e:
        raise ValueError(f"{flag}={value!r}: cannot be written ({e.strerror or e})") from None
    finally:
        if not existed:
            with contextlib.suppress(OSError):
                path.unlink()
    return Output(flag, value)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False
