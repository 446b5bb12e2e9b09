"""The medakv cache file format (README "File format") for the tests: a small safetensors reader and writer.

safetensors: 8 bytes little-endian header length, a JSON header naming each
tensor's dtype, shape and byte range, then the data. Arrays here are in
their wire form: float16, float32, bfloat16 as uint16 bit patterns, int32.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

# (file dtype, numpy dtype of the wire form)
_NUMPY = {"F16": np.dtype("<f2"), "BF16": np.dtype("<u2"), "F32": np.dtype("<f4"), "I32": np.dtype("<i4"),
          "U8": np.dtype("u1")}
FILE_DTYPE = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}


def write(path: Path, tensors: Dict[str, Tuple[str, np.ndarray]], metadata: Optional[Dict[str, str]] = None) -> None:
    """tensors: name -> (file dtype, array)."""
    header: Dict[str, object] = {}
    blobs: List[bytes] = []
    offset = 0
    for name, (dtype, array) in tensors.items():
        data = np.ascontiguousarray(array, dtype=_NUMPY[dtype]).tobytes()
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in blobs:
            f.write(blob)


def read(path: Path) -> Tuple[Dict[str, Tuple[str, Tuple[int, ...], bytes]], Dict[str, str]]:
    """name -> (file dtype, shape, raw bytes), and the metadata."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    metadata = header.pop("__metadata__", {})
    data = raw[8 + n:]
    return ({name: (t["dtype"], tuple(t["shape"]), data[t["data_offsets"][0]:t["data_offsets"][1]])
             for name, t in header.items()}, metadata)


def write_cache(path: Path, dtype: str, keys: Sequence[np.ndarray], values: Sequence[np.ndarray],
                queries: Optional[Sequence[np.ndarray]] = None,
                query_positions: Optional[Sequence[np.ndarray]] = None,
                query_outside_lse: Optional[Sequence[np.ndarray]] = None,
                scores: Optional[Sequence[np.ndarray]] = None, entropy: Optional[Sequence[float]] = None,
                modality: Optional[np.ndarray] = None) -> None:
    """An input cache file; arrays in wire form, dims in the file's layout."""
    kv = FILE_DTYPE[dtype]
    tensors: Dict[str, Tuple[str, np.ndarray]] = {}
    for l, (k, v) in enumerate(zip(keys, values)):
        tensors[f"layer.{l}.key"] = (kv, k)
        tensors[f"layer.{l}.value"] = (kv, v)
        if queries is not None:
            tensors[f"layer.{l}.query"] = (kv, queries[l])
        if query_positions is not None:
            tensors[f"layer.{l}.query_positions"] = ("I32", np.asarray(query_positions[l], dtype=np.int32))
        if query_outside_lse is not None:
            tensors[f"layer.{l}.query_outside_lse"] = ("F32", np.asarray(query_outside_lse[l], dtype=np.float32))
        if scores is not None:
            assert entropy is not None
            tensors[f"layer.{l}.scores"] = ("F32", scores[l])
            tensors[f"layer.{l}.entropy"] = ("F32", np.array([entropy[l]], dtype=np.float32))
    if modality is not None:
        tensors["modality"] = ("U8", np.asarray(modality, dtype=np.uint8))
    write(path, tensors)
