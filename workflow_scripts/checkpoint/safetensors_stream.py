"""Safetensors read through a memory map and written tensor by tensor, for bounded memory.

The ``safetensors`` package writes a file from a dict of whole tensors; a 7-8B
checkpoint must instead be written as it is produced. The format is simple: an
8-byte little-endian header length, a JSON header of dtypes, shapes and byte
offsets (padded with spaces to 8 bytes), then the data. Since every output
tensor's dtype and shape are known before any is computed, the header is
written first and the data streamed after it.
"""

import json
import mmap
import os
import queue
import struct
import threading
from pathlib import Path

import torch

from workflow_scripts.core.errors import InputError

DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I8": torch.int8,
    "U8": torch.uint8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "BOOL": torch.bool,
}
NAMES = {dtype: name for name, dtype in DTYPES.items()}


class SafetensorsFile:
    """A safetensors file opened read-only through mmap; ``tensor(name)`` views without copying."""

    def __init__(self, path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise InputError(f"{self.path}: truncated safetensors file ({size} bytes)")
            (header_size,) = struct.unpack("<Q", prefix)
            if header_size > size - 8:
                raise InputError(
                    f"{self.path}: truncated or corrupt safetensors file (header of {header_size} "
                    f"bytes in a file of {size})"
                )
            try:
                header = json.loads(handle.read(header_size))
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise InputError(f"{self.path}: corrupt safetensors header ({error})") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self.entries = header
        self.data_start = 8 + header_size
        for name, entry in header.items():
            begin, end = entry["data_offsets"]
            if entry["dtype"] not in DTYPES:
                raise InputError(f"{self.path}: tensor {name} has unsupported dtype {entry['dtype']}")
            if self.data_start + end > size:
                raise InputError(
                    f"{self.path}: tensor {name} ends at byte {self.data_start + end}, past the end "
                    f"of the file ({size} bytes): the file is truncated"
                )
            expected = _numel(entry["shape"]) * torch.tensor([], dtype=DTYPES[entry["dtype"]]).element_size()
            if end - begin != expected:
                raise InputError(f"{self.path}: tensor {name} has {end - begin} bytes for shape {entry['shape']}")
        self._map = None

    def __enter__(self):
        if os.path.getsize(self.path) > self.data_start:
            with open(self.path, "rb") as handle:
                self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        return self

    def __exit__(self, *exc):
        if self._map is not None:
            self._map.close()
        self._map = None

    def dtype(self, name):
        return DTYPES[self.entries[name]["dtype"]]

    def shape(self, name):
        return tuple(self.entries[name]["shape"])

    def raw_size(self, name):
        begin, end = self.entries[name]["data_offsets"]
        return end - begin

    def release_bytes(self, name, first, end):
        """Drop the mapped pages wholly inside bytes ``[first, end)`` of a tensor from this process.

        They stay in the page cache and are read again if touched; without this,
        every page read through the map counts towards the process's resident set.
        """
        base = self.data_start + self.entries[name]["data_offsets"][0]
        start = -(-(base + first) // mmap.PAGESIZE) * mmap.PAGESIZE
        stop = (base + end) // mmap.PAGESIZE * mmap.PAGESIZE
        if stop > start:
            self._map.madvise(mmap.MADV_DONTNEED, start, stop - start)

    def prefetch(self, name):
        """Ask the kernel to start reading a tensor's pages now, so disk reads overlap compute."""
        begin, end = self.entries[name]["data_offsets"]
        start = (self.data_start + begin) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > begin:
            self._map.madvise(mmap.MADV_WILLNEED, start, self.data_start + end - start)

    def release(self, name, first_element, end_element):
        """``release_bytes`` in elements of the tensor's dtype."""
        size = torch.tensor([], dtype=self.dtype(name)).element_size()
        self.release_bytes(name, first_element * size, end_element * size)

    def raw(self, name):
        """The tensor's bytes as a zero-copy memoryview of the map."""
        begin, end = self.entries[name]["data_offsets"]
        return memoryview(self._map)[self.data_start + begin : self.data_start + end]

    def tensor(self, name):
        """A read-only, zero-copy tensor view; pages are read from disk as they are touched."""
        raw = self.raw(name)
        if not len(raw):
            return torch.empty(self.shape(name), dtype=self.dtype(name))
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the view is read-only by design
            return torch.frombuffer(raw, dtype=self.dtype(name)).view(self.shape(name))


def _numel(shape):
    count = 1
    for size in shape:
        count *= size
    return count


class SafetensorsWriter:
    """Write a safetensors file whose tensors are declared first and then streamed in order.

    ``declare`` every tensor (name, dtype, shape), then ``write`` their bytes in
    declaration order, in as many pieces as convenient; ``close`` checks that
    every byte arrived. Write to a temporary path and rename it afterwards.
    """

    def __init__(self, path, layout, metadata=None):
        self.path = Path(path)
        header, offset = {}, 0
        self.order = []
        for name, dtype, shape in layout:
            size = _numel(shape) * torch.tensor([], dtype=dtype).element_size()
            header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            self.order.append((name, size))
            offset += size
        if metadata:
            header = {"__metadata__": metadata, **header}
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self.handle = open(self.path, "wb")
        self.handle.write(struct.pack("<Q", len(encoded)) + encoded)
        self.total, self.written = offset, 0

    def write(self, tensor):
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        self.handle.write(memoryview(data))
        self.written += data.nbytes

    def write_bytes(self, raw):
        self.handle.write(raw)
        self.written += len(raw)

    def close(self):
        self.handle.close()
        if self.written != self.total:
            raise RuntimeError(f"{self.path}: wrote {self.written} of {self.total} declared bytes")


class BackgroundWriter:
    """A :class:`SafetensorsWriter` fed through a bounded queue and drained by a thread.

    Writing to disk releases the GIL, so while one chunk is written the next is
    computed; ``depth`` bounds the chunks in flight (and so the memory). An
    item may carry a callback run once its bytes are written (to release the
    source pages it was copied from).
    """

    def __init__(self, writer, depth=4):
        self.writer = writer
        self.queue = queue.Queue(maxsize=depth)
        self.error = None
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()

    def _drain(self):
        while (item := self.queue.get()) is not None:
            data, written = item
            if self.error is None:
                try:
                    if isinstance(data, torch.Tensor):
                        self.writer.write(data)
                    else:
                        self.writer.write_bytes(data)
                    if written:
                        written()
                except BaseException as error:  # reported by close()
                    self.error = error

    def write(self, data, written=None):
        if self.error is not None:
            raise self.error
        self.queue.put((data, written))

    def close(self):
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
        self.writer.close()
