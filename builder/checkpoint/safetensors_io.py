"""Streaming safetensors writer: header from shapes/dtypes first, then tensor bytes one at a time."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterable

import torch

from builder.errors import CheckpointError

ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int8: "I8",
             torch.uint8: "U8", torch.float8_e4m3fn: "F8_E4M3"}


def build_header(entries: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> bytes:
    """safetensors header (8-byte length + JSON padded to 8 bytes) for tensors laid out in the given order."""
    meta: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in entries:
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        meta[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    body = json.dumps(meta, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body


def write_streaming(path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                    tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Write `tensors` (yielded in `entries` order, matching dtype/shape) to path atomically, one at a time."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    expected = iter(entries)
    try:
        with open(tmp, "wb") as f:
            f.write(build_header(entries))
            for name, tensor in tensors:
                want = next(expected, None)
                if want is None or (name, tensor.dtype, tuple(tensor.shape)) != (want[0], want[1], tuple(want[2])):
                    raise CheckpointError(f"internal error writing {path}: got {name} {tensor.dtype} "
                                          f"{list(tensor.shape)}, expected {want}; please report this bug")
                f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())  # raw bytes (int8, e4m3 too)
        if next(expected, None) is not None:
            raise CheckpointError(f"internal error writing {path}: fewer tensors than planned; please report this bug")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
