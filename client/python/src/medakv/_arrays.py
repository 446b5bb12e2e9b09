"""Tensors in and out: NumPy arrays and (when the caller uses PyTorch) torch tensors.

Nothing here imports torch: a tensor is recognised through ``sys.modules``,
so the package works without torch installed and costs nothing when the
caller does not use it.

On the wire every tensor is raw little-endian bytes: float16, bfloat16 (the
upper half of a float32) or float32 for keys, values and queries; int32 for
positions; float32 for scores and entropy. bfloat16 arrives from NumPy as
``ml_dtypes.bfloat16`` arrays or as ``uint16`` arrays holding the bit
patterns, and from PyTorch as ``torch.bfloat16``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Dict

import numpy as np

__all__ = ["KV_DTYPES", "Output", "Wire", "as_kv", "as_float32", "as_int32", "is_tensor", "to_output"]

#: The element types of keys, values and queries.
KV_DTYPES = ("float16", "bfloat16", "float32")

# Wire representation of each element type (bfloat16 as its bit patterns).
_WIRE: Dict[str, "np.dtype[Any]"] = {
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
    "float32": np.dtype("<f4"),
    "int32": np.dtype("<i4"),
}


def _torch() -> Any:
    """The torch module if the process imported it, else None."""
    return sys.modules.get("torch")


def is_torch_tensor(x: object) -> bool:
    torch = _torch()
    return torch is not None and isinstance(x, torch.Tensor)


def is_tensor(x: object) -> bool:
    """A NumPy array or a torch tensor."""
    return isinstance(x, np.ndarray) or is_torch_tensor(x)


@dataclass(frozen=True)
class Output:
    """How result tensors are handed back.

    ``torch_device`` not None: torch tensors on that device (bfloat16 as
    ``torch.bfloat16``). Otherwise NumPy arrays; bfloat16 as
    ``ml_dtypes.bfloat16`` when ``ml_dtypes_bf16``, else ``uint16`` bit patterns.
    """

    torch_device: Any = None
    ml_dtypes_bf16: bool = False


@dataclass(frozen=True)
class Wire:
    """One tensor ready to send: C-contiguous, little-endian, in its wire dtype."""

    array: np.ndarray
    dtype: str  # "float16" | "bfloat16" | "float32" | "int32"
    output: Output  # how results that mirror this input are handed back

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.array.shape)

    def data(self) -> memoryview:
        """The bytes, without a copy."""
        return self.array.reshape(-1).view(np.uint8).data


def _type_name(x: object) -> str:
    t = type(x)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def as_kv(x: object, what: str) -> Wire:
    """A key, value or query tensor: float16, bfloat16 or float32.

    TypeError naming ``what`` for anything else (another dtype, a list, ...).
    """
    torch = _torch()
    if torch is not None and isinstance(x, torch.Tensor):
        names = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
        dtype = names.get(x.dtype)
        if dtype is None:
            raise TypeError(f"{what}: torch dtype {x.dtype} is not supported "
                            "(expected torch.float16, torch.bfloat16 or torch.float32)")
        t = x.detach().to("cpu").contiguous()
        array = t.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else t.numpy()
        return Wire(np.ascontiguousarray(array, dtype=_WIRE[dtype]), dtype, Output(torch_device=x.device))
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{what}: expected a numpy.ndarray or torch.Tensor, got {_type_name(x)}")
    dt = x.dtype
    ml_dtypes_bf16 = False
    if dt.name == "bfloat16":  # ml_dtypes (also what JAX uses)
        x = x.view(np.uint16)
        dtype, ml_dtypes_bf16 = "bfloat16", True
    elif dt.kind == "u" and dt.itemsize == 2:
        dtype = "bfloat16"  # bit patterns
    elif dt.kind == "f" and dt.itemsize == 2:
        dtype = "float16"
    elif dt.kind == "f" and dt.itemsize == 4:
        dtype = "float32"
    else:
        raise TypeError(f"{what}: dtype {dt} is not supported (expected float16, float32, or bfloat16 as "
                        "ml_dtypes.bfloat16 or uint16 bit patterns)")
    return Wire(np.ascontiguousarray(x, dtype=_WIRE[dtype]), dtype, Output(ml_dtypes_bf16=ml_dtypes_bf16))


def as_float32(x: object, what: str) -> np.ndarray:
    """Scores: any floating tensor, converted to contiguous little-endian float32."""
    torch = _torch()
    if torch is not None and isinstance(x, torch.Tensor):
        if not x.is_floating_point():
            raise TypeError(f"{what}: torch dtype {x.dtype} is not a floating type")
        return np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy(), dtype=_WIRE["float32"])
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{what}: expected a numpy.ndarray or torch.Tensor, got {_type_name(x)}")
    if x.dtype.name == "bfloat16":
        x = x.astype(np.float32)
    elif x.dtype.kind != "f":
        raise TypeError(f"{what}: dtype {x.dtype} is not a floating type")
    return np.ascontiguousarray(x, dtype=_WIRE["float32"])


def as_int32(x: object, what: str) -> np.ndarray:
    """Positions: an integer tensor or a sequence of ints, as contiguous little-endian int32.

    ValueError for values outside the int32 range.
    """
    torch = _torch()
    if torch is not None and isinstance(x, torch.Tensor):
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"{what}: torch dtype {x.dtype} is not an integer type")
        x = x.detach().to("cpu").numpy()
    elif isinstance(x, (list, tuple)):
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in x):
            raise TypeError(f"{what}: expected integers")
        x = np.asarray(x, dtype=np.int64)
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{what}: expected an integer numpy.ndarray, torch.Tensor or list of ints, "
                        f"got {_type_name(x)}")
    if x.dtype.kind not in "iu":
        raise TypeError(f"{what}: dtype {x.dtype} is not an integer type")
    if x.size and (int(x.min()) < -(2**31) or int(x.max()) >= 2**31):
        raise ValueError(f"{what}: values outside the int32 range")
    return np.ascontiguousarray(x, dtype=_WIRE["int32"])


def to_output(buffer: np.ndarray, dtype: str, shape: tuple[int, ...], output: Output) -> Any:
    """A result tensor from its received bytes (``buffer``: uint8, writable, exactly its size)."""
    array = buffer.view(_WIRE[dtype]).reshape(shape)
    if output.torch_device is not None:
        torch = _torch()
        if torch is None:  # the caller gave torch tensors, so torch is imported
            raise RuntimeError("torch was unloaded")
        native = array.astype(array.dtype.newbyteorder("="), copy=False)
        if dtype == "bfloat16":
            tensor = torch.from_numpy(native.view(np.int16)).view(torch.bfloat16)
        else:
            tensor = torch.from_numpy(native)
        return tensor.to(output.torch_device)
    if dtype == "bfloat16" and output.ml_dtypes_bf16:
        import ml_dtypes  # the caller gave ml_dtypes arrays, so it is installed

        return array.view(ml_dtypes.bfloat16)
    return array
