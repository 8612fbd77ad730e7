"""A GGUF file's key/value metadata as plain Python values.

``gguf.GGUFReader`` builds one numpy view per array element while it opens a file: for a 49k-token
vocabulary (tokens, scores, types, merges) that is ~250k views and several seconds, which alone
blows a sub-second model load. This module walks the same bytes with ``struct`` and turns each
value straight into Python objects: ~50 ms for SmolLM2's 49k vocabulary, dominated by decoding
its ~98k strings. It reads an open ``GGUFReader``'s buffer the same way, so both inputs give
identical dicts.

Value mapping (GGUF type -> Python): integers -> ``int``, float32/64 -> ``float``, bool -> ``bool``,
string -> ``str``, array -> ``list`` of those (nested arrays -> nested lists). Float32 values are
widened exactly, e.g. 1e-5 stored as f32 reads back as 9.999999747378752e-06.
"""

from __future__ import annotations

import mmap
import os
import struct
from typing import Any, NamedTuple

import numpy as np

from lmengine.errors import ModelFileError, ModelNotFoundError, UnsupportedModelError

__all__ = ["GGUFTensorInfo", "GGUFHeader", "read_gguf_metadata", "read_gguf_header"]

_GGUF_MAGIC = b"GGUF"
_SUPPORTED_VERSIONS = (2, 3)  # v1 used 32-bit counts; no current file uses it
_DEFAULT_ALIGNMENT = 32

# GGUF value type id -> struct/numpy format character (fixed-width types only).
_FIXED_WIDTH_FORMATS = {
    0: "B",  # uint8
    1: "b",  # int8
    2: "H",  # uint16
    3: "h",  # int16
    4: "I",  # uint32
    5: "i",  # int32
    6: "f",  # float32
    7: "?",  # bool
    10: "Q",  # uint64
    11: "q",  # int64
    12: "d",  # float64
}
_TYPE_STRING = 8
_TYPE_ARRAY = 9


class GGUFTensorInfo(NamedTuple):
    """One entry of the tensor table. ``shape`` is in ggml order (fastest-varying first)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # bytes from the start of the data section


class GGUFHeader(NamedTuple):
    """Everything in a GGUF file before the tensor data."""

    version: int
    metadata: dict[str, Any]
    tensors: list[GGUFTensorInfo]
    data_offset: int  # absolute file offset of the (aligned) tensor data section


class _MetadataParser:
    """Sequential reader over a buffer holding a GGUF file (mmap, bytes or memoryview)."""

    def __init__(self, buffer: Any, source: str):
        self.buffer = buffer
        self.source = source
        self.position = 0
        self.byte_order = "<"

    def read_header(self) -> GGUFHeader:
        if bytes(self.buffer[0:4]) != _GGUF_MAGIC:
            raise ModelFileError(f"{self.source} is not a GGUF file (missing 'GGUF' magic bytes).")
        (version,) = struct.unpack_from("<I", self.buffer, 4)
        if version & 0xFFFF == 0:  # a big-endian file read as little-endian
            self.byte_order = ">"
            (version,) = struct.unpack_from(">I", self.buffer, 4)
        if version not in _SUPPORTED_VERSIONS:
            raise UnsupportedModelError(
                f"{self.source} is GGUF version {version}; supported: 2, 3."
            )
        tensor_count, kv_count = struct.unpack_from(self.byte_order + "QQ", self.buffer, 8)
        self.position = 24

        metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key = self.read_string()
            (value_type,) = self._unpack("I")
            try:
                metadata[key] = self.read_value(value_type)
            except UnicodeDecodeError as error:
                raise ModelFileError(
                    f"{self.source}: metadata '{key}' is not valid UTF-8."
                ) from error

        tensors = []
        for _ in range(tensor_count):
            name = self.read_string()
            (dim_count,) = self._unpack("I")
            shape = self._unpack(f"{dim_count}Q")
            ggml_type, offset = self._unpack("IQ")
            tensors.append(GGUFTensorInfo(name, tuple(shape), ggml_type, offset))

        alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
        data_offset = -(-self.position // alignment) * alignment
        return GGUFHeader(version, metadata, tensors, data_offset)

    def _unpack(self, fmt: str) -> tuple:
        layout = struct.Struct(self.byte_order + fmt)
        values = layout.unpack_from(self.buffer, self.position)
        self.position += layout.size
        return values

    def read_string(self) -> str:
        (length,) = struct.unpack_from(self.byte_order + "Q", self.buffer, self.position)
        start = self.position + 8
        self.position = start + length
        if self.position > len(self.buffer):
            raise struct.error("string runs past the end of the file")
        return str(self.buffer[start : self.position], "utf-8")

    def read_value(self, value_type: int) -> Any:
        fixed = _FIXED_WIDTH_FORMATS.get(value_type)
        if fixed is not None:
            return self._unpack(fixed)[0]
        if value_type == _TYPE_STRING:
            return self.read_string()
        if value_type == _TYPE_ARRAY:
            element_type, count = self._unpack("IQ")
            return self.read_array(element_type, count)
        raise ModelFileError(f"{self.source}: unknown GGUF metadata value type {value_type}.")

    def read_array(self, element_type: int, count: int) -> list:
        # Every element takes at least 1 byte (8 for a string's length): a corrupt count must
        # fail here, not allocate a list of 2**60 entries.
        if count > len(self.buffer) - self.position:
            raise struct.error(f"array of {count} elements runs past the end of the file")
        fixed = _FIXED_WIDTH_FORMATS.get(element_type)
        if fixed is not None:
            dtype = np.dtype(self.byte_order + fixed)
            end = self.position + count * dtype.itemsize
            if end > len(self.buffer):
                raise struct.error("array runs past the end of the file")
            values = np.frombuffer(self.buffer, dtype=dtype, count=count, offset=self.position)
            self.position = end
            return values.tolist()
        if element_type == _TYPE_STRING:
            return self._read_string_array(count)
        return [self.read_value(element_type) for _ in range(count)]

    def _read_string_array(self, count: int) -> list[str]:
        # The hot loop of the whole load (vocabulary and merges): locals only, no method calls.
        buffer, position, end_of_buffer = self.buffer, self.position, len(self.buffer)
        unpack_length = struct.Struct(self.byte_order + "Q").unpack_from
        strings = [""] * count
        for index in range(count):
            (length,) = unpack_length(buffer, position)
            position += 8
            strings[index] = str(buffer[position : position + length], "utf-8")
            position += length
        if position > end_of_buffer:
            raise struct.error("string array runs past the end of the file")
        self.position = position
        return strings


def _parse(buffer: Any, source: str) -> GGUFHeader:
    parser = _MetadataParser(buffer, source)
    try:
        return parser.read_header()
    except struct.error as error:
        raise ModelFileError(f"{source} is truncated or corrupt: {error}.") from error


def _parse_file(path: str | os.PathLike[str]) -> GGUFHeader:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelNotFoundError(f"No GGUF file at {path!r}.")
    with open(path, "rb") as file:
        if os.fstat(file.fileno()).st_size < 24:
            raise ModelFileError(f"{path} is too short to be a GGUF file.")
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return _parse(mapped, path)


def _parse_reader(reader: Any) -> GGUFHeader:
    data = getattr(reader, "data", None)
    if data is None:
        raise TypeError(
            f"read_gguf_metadata expects a path or a gguf.GGUFReader, got {type(reader).__name__}."
        )
    return _parse(memoryview(data), str(getattr(reader, "path", "<GGUFReader>")))


def read_gguf_metadata(path_or_reader: Any) -> dict[str, Any]:
    """Every metadata key/value of a GGUF file as plain Python values.

    ``path_or_reader`` is a filesystem path or an open ``gguf.GGUFReader`` (its buffer is read
    directly; ``GGUFReader.fields`` is not used because converting it is the slow path).
    String arrays come back as ``list[str]``, ``tokenizer.ggml.scores`` as ``list[float]``,
    ``tokenizer.ggml.token_type`` as ``list[int]``.

    Raises ``ModelNotFoundError`` for a missing path and ``ModelFileError`` for a file that is
    not GGUF, is truncated, or holds invalid UTF-8.
    """
    return read_gguf_header(path_or_reader).metadata


def read_gguf_header(path_or_reader: Any) -> GGUFHeader:
    """Metadata, tensor table and data-section offset of a GGUF file; tensor data is not read."""
    if isinstance(path_or_reader, (str, os.PathLike)):
        return _parse_file(path_or_reader)
    return _parse_reader(path_or_reader)
