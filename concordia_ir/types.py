"""Scalar and pointer types of the IR, with their numpy and text spellings."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import KernelSyntaxError


@dataclass(frozen=True)
class ScalarType:
    name: str
    bits: int
    kind: str  # 'int', 'uint', 'float' or 'bool'

    @property
    def is_int(self) -> bool:
        return self.kind in ("int", "uint")

    @property
    def is_float(self) -> bool:
        return self.kind == "float"

    @property
    def is_signed(self) -> bool:
        return self.kind == "int"

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(_DTYPES[self.name])

    @property
    def min(self) -> int:
        return -(1 << (self.bits - 1)) if self.kind == "int" else 0

    @property
    def max(self) -> int:
        if self.kind == "bool":
            return 1
        return (1 << (self.bits - 1)) - 1 if self.kind == "int" else (1 << self.bits) - 1

    def __str__(self) -> str:
        return self.name

    # Calling a type inside a kernel is an explicit cast; outside, it builds a numpy scalar.
    def __call__(self, value):
        return self.dtype.type(value)


@dataclass(frozen=True)
class PtrType:
    elem: ScalarType
    space: str = "global"  # 'global' or 'local'

    def __str__(self) -> str:
        return f"ptr<{self.space} {self.elem}>"


Type = ScalarType | PtrType

i32 = ScalarType("i32", 32, "int")
u32 = ScalarType("u32", 32, "uint")
i64 = ScalarType("i64", 64, "int")
u64 = ScalarType("u64", 64, "uint")
f32 = ScalarType("f32", 32, "float")
f64 = ScalarType("f64", 64, "float")
boolean = ScalarType("bool", 8, "bool")

SCALARS: dict[str, ScalarType] = {t.name: t for t in (i32, u32, i64, u64, f32, f64, boolean)}
ADDRESS_SPACES = ("global", "local")
_DTYPES = {"i32": "int32", "u32": "uint32", "i64": "int64", "u64": "uint64",
           "f32": "float32", "f64": "float64", "bool": "bool"}
_BY_DTYPE = {np.dtype(v): SCALARS[k] for k, v in _DTYPES.items()}


def scalar_for_dtype(dtype) -> ScalarType | None:
    return _BY_DTYPE.get(np.dtype(dtype))


class _PtrFactory:
    """`Ptr[f32]` or `Ptr[f32, "local"]` in kernel annotations."""

    def __getitem__(self, key) -> PtrType:
        elem, space = (key if isinstance(key, tuple) and len(key) == 2 else (key, "global"))
        if not isinstance(elem, ScalarType) or space not in ADDRESS_SPACES:
            shown = getattr(key, "__name__", repr(key))
            raise KernelSyntaxError(f"Ptr[...] takes a scalar type (i32, f32, ...) and optionally "
                                    f"'global' or 'local', got {shown}")
        return PtrType(elem, space)


Ptr = _PtrFactory()
