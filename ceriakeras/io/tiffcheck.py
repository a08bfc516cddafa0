"""A TIFF's page table checked against the file's size before any page is parsed or read.

A damaged or hostile TIFF can declare thousands of pages whose image data lie past the end of the
file; tifffile then parses every page and the reader fails late (a 2.5 MB file declaring 20 000
pages took 113 s to refuse). :func:`whole_pages` walks the chain of image file directories
(IFDs) itself, reading only the strip and tile offsets and byte counts of each page, and counts
the leading pages whose data lie inside the file: a few milliseconds per thousand pages.

:func:`check_tiff_pages` refuses a file whose first page is not whole; a file cut later keeps
its whole pages (``analyze`` then reads those, as for any multi-page TIFF).
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

import numpy as np

from ..config import InputError

MAX_PAGES = 1_000_000
"""Most pages walked; a longer chain is refused (a loop in the chain is refused at once)."""
_OFFSET_TAGS = (273, 324)  # StripOffsets, TileOffsets
_COUNT_TAGS = (279, 325)  # StripByteCounts, TileByteCounts
_TYPES = {3: "H", 4: "I", 16: "Q", 1: "B", 13: "I"}  # SHORT, LONG, LONG8, BYTE, IFD


def whole_pages(path) -> tuple[int, int, int]:
    """``(whole, declared, end)`` for a TIFF: the number of leading pages whose image data lie
    inside the file, the number of pages its IFD chain declares, and the largest byte offset the
    declared data reach (bytes).

    Raises
    ------
    InputError
        Not a TIFF, an IFD outside the file, a loop in the IFD chain, more than
        :data:`MAX_PAGES` pages.
    """
    path = Path(path)
    with open(path, "rb") as fh:
        size = fh.seek(0, 2)
        if size < 8:
            raise InputError(f"{path} is too short to be a TIFF")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _walk(path, data, size)


def _walk(path: Path, data, size: int) -> tuple[int, int, int]:
    order = {b"II": "<", b"MM": ">"}.get(bytes(data[:2]))
    if order is None:
        raise InputError(f"{path} is not a TIFF (no II/MM byte order mark)")
    magic = struct.unpack_from(order + "H", data, 2)[0]
    if magic == 42:
        count_fmt, entry_size, next_fmt, value_size = "H", 12, "I", 4
        offset = struct.unpack_from(order + "I", data, 4)[0]
    elif magic == 43 and size >= 16:
        count_fmt, entry_size, next_fmt, value_size = "Q", 20, "Q", 8
        offset = struct.unpack_from(order + "Q", data, 8)[0]
    else:
        raise InputError(f"{path} is not a TIFF (magic number {magic})")
    count_len, next_len = struct.calcsize(count_fmt), struct.calcsize(next_fmt)
    seen: set[int] = set()
    declared, whole, reach, cut = 0, 0, 0, False
    while offset:
        if offset in seen:
            raise InputError(f"{path} is damaged: its page chain loops back on itself")
        if declared >= MAX_PAGES:
            raise InputError(f"{path} declares more than {MAX_PAGES:,} pages; split the series")
        seen.add(offset)
        if offset + count_len > size:
            break  # the chain points past the end: the file was cut here
        n = struct.unpack_from(order + count_fmt, data, offset)[0]
        table = offset + count_len
        if table + n * entry_size + next_len > size:
            break
        tags = {}
        for i in range(n):
            e = table + i * entry_size
            tag, typ = struct.unpack_from(order + "HH", data, e)
            if tag in _OFFSET_TAGS or tag in _COUNT_TAGS:
                tags[tag] = _values(data, order, typ, e + 4, value_size, size)
        declared += 1
        end = _page_end(tags)
        reach = max(reach, end)
        if end > size or end < 0:
            cut = True
        if not cut:
            whole += 1
        offset = struct.unpack_from(order + next_fmt, data, table + n * entry_size)[0]
    return whole, declared, reach


def _values(data, order: str, typ: int, at: int, value_size: int, size: int) -> np.ndarray:
    """The values of one IFD entry (count and values or their offset start at ``at``)."""
    code = _TYPES.get(typ)
    if code is None:
        return np.zeros(0, np.int64)
    count_fmt = "I" if value_size == 4 else "Q"
    count = struct.unpack_from(order + count_fmt, data, at)[0]
    item = struct.calcsize(code)
    where = at + value_size
    if count * item > value_size:
        where = struct.unpack_from(order + count_fmt, data, where)[0]
    if where + count * item > size:
        return np.array([size + 1], np.int64)  # the table itself lies past the end
    dtype = np.dtype(code).newbyteorder(order)
    return np.frombuffer(data[where:where + count * item], dtype).astype(np.int64)


def _page_end(tags: dict) -> int:
    """Largest end (byte offset) of a page's strips or tiles; 0 if it names none."""
    for off_tag, cnt_tag in zip(_OFFSET_TAGS, _COUNT_TAGS):
        offsets, counts = tags.get(off_tag), tags.get(cnt_tag)
        if offsets is not None and counts is not None and len(offsets) and len(counts):
            n = min(len(offsets), len(counts))
            return int(np.max(offsets[:n] + counts[:n]))
    return 0


def check_tiff_pages(path) -> tuple[int, int]:
    """``(whole, declared)`` pages of a TIFF (:func:`whole_pages`), refused if none is whole.

    Raises
    ------
    InputError
        The first page's data lie past the end of the file (the message gives both sizes).
    """
    whole, declared, reach = whole_pages(path)
    if declared and not whole:
        size = Path(path).stat().st_size
        raise InputError(f"{path} is truncated or damaged: it declares {declared} page(s) whose "
                         f"data reach byte {reach:,}, the file has {size:,} bytes and not even "
                         "its first page is whole")
    return whole, declared
