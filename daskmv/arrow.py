"""Arrow arrays from Python values without ``pa.array``, so that worker processes never import pandas.

``pa.array`` imports pandas the first time it runs, whatever it converts: pyarrow's pandas shim checks every
input for pandas types (categoricals, series, time zones). A worker builds its partition's table from lists
and has no other use for pandas, whose import cost each worker process 26 MB and 0.2-0.35 s of a run. These
arrays are assembled from their buffers instead (validity bitmap, offsets, values): the same arrays as
``pa.array(values, type)`` gives (the tests compare them), for the types partition tables hold.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa


def array(values: Sequence[Any] | np.ndarray, type: pa.DataType) -> pa.Array:
    """``pa.array(values, type)`` for string, boolean, integer and floating-point ``type``s, and lists of numbers
    or booleans.

    None is null; NaN stays a NaN value in floating-point arrays, as with ``pa.array`` of a list.
    """
    n = len(values)
    if isinstance(values, np.ndarray) and values.dtype != object:
        present = np.ones(n, dtype=bool)
    else:
        present = np.fromiter((v is not None for v in values), dtype=bool, count=n)
    nulls = n - int(present.sum())
    validity = pa.py_buffer(np.packbits(present, bitorder="little")) if nulls else None
    if pa.types.is_string(type) or pa.types.is_large_string(type):
        encoded = [v.encode() if v is not None else b"" for v in values]
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=offsets[1:])
        out = pa.Array.from_buffers(pa.large_string(), n, [validity, pa.py_buffer(offsets),
                                                           pa.py_buffer(b"".join(encoded))], nulls)
        return out if pa.types.is_large_string(type) else out.cast(type)
    if pa.types.is_boolean(type):
        bits = np.fromiter((bool(v) for v in values), dtype=bool, count=n) & present
        return pa.Array.from_buffers(type, n, [validity, pa.py_buffer(np.packbits(bits, bitorder="little"))], nulls)
    if pa.types.is_integer(type) or pa.types.is_floating(type):
        dtype = np.dtype(type.to_pandas_dtype())
        if nulls:
            values = [v if v is not None else 0 for v in values]
        data = np.ascontiguousarray(values, dtype=dtype)
        return pa.Array.from_buffers(type, n, [validity, pa.py_buffer(data)], nulls)
    if pa.types.is_list(type) and (pa.types.is_integer(type.value_type) or pa.types.is_floating(type.value_type)):
        dtype = np.dtype(type.value_type.to_pandas_dtype())
        parts = [np.asarray(v, dtype=dtype).ravel() if v is not None else np.zeros(0, dtype) for v in values]
        offsets = np.zeros(n + 1, dtype=np.int32)
        np.cumsum([len(p) for p in parts], out=offsets[1:])
        flat = np.concatenate(parts) if parts else np.zeros(0, dtype)
        child = pa.Array.from_buffers(type.value_type, len(flat), [None, pa.py_buffer(flat)])
        return pa.Array.from_buffers(type, n, [validity, pa.py_buffer(offsets)], nulls, children=[child])
    if pa.types.is_list(type) and pa.types.is_boolean(type.value_type):
        parts = [np.asarray(v, dtype=bool).ravel() if v is not None else np.zeros(0, bool) for v in values]
        offsets = np.zeros(n + 1, dtype=np.int32)
        np.cumsum([len(p) for p in parts], out=offsets[1:])
        flat = np.concatenate(parts) if parts else np.zeros(0, bool)
        child = pa.Array.from_buffers(type.value_type, len(flat), [None, pa.py_buffer(np.packbits(flat, bitorder="little"))])
        return pa.Array.from_buffers(type, n, [validity, pa.py_buffer(offsets)], nulls, children=[child])
    raise TypeError(f"no Arrow array of type {type} from Python values here")
