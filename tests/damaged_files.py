"""Damaged copies of files for the tests: a checkpoint with one byte flipped inside its largest tensor."""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

ZIP_LOCAL_HEADER_BYTES = 30


def flip_tensor_byte(source: Path, target: Path, offset: int = 100) -> None:
    """Copy a `torch.save` file with one byte of its largest tensor flipped: the zip still opens."""
    data = bytearray(source.read_bytes())
    with zipfile.ZipFile(source) as archive:
        largest = max(archive.infolist(), key=lambda info: info.file_size)
    header = largest.header_offset
    name_length, extra_length = struct.unpack("<HH", data[header + 26 : header + ZIP_LOCAL_HEADER_BYTES])
    data[header + ZIP_LOCAL_HEADER_BYTES + name_length + extra_length + offset] ^= 0xFF
    target.write_bytes(bytes(data))
