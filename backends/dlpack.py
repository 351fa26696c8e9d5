"""Read a DLPack capsule's tensor descriptor (data pointer, device, dtype, shape), so that an
inference engine's tensors (torch, CuPy) can be wrapped as device buffers without a copy."""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

from concordia_ir.errors import ConcordiaError

KDL_CPU, KDL_CUDA, KDL_CUDA_HOST, KDL_ROCM = 1, 2, 3, 10
KDL_DEVICE_NAMES = {KDL_CPU: "cpu", KDL_CUDA: "cuda", KDL_CUDA_HOST: "cuda-pinned-host",
                    KDL_ROCM: "rocm"}
_NUMPY_KINDS = {0: "i", 1: "u", 2: "f"}   # DLPack int, uint, float: numpy names them


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32),
                ("dtype", _DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


def region_dtype(code: int, bits: int, lanes: int) -> np.dtype:
    """The numpy dtype a tensor of this DLPack type is wrapped as. Regions are bytes: int,
    uint and float types numpy knows keep their type; any other (bfloat16, the float8 kinds,
    bool, ...) is seen as unsigned integers of its width, bit for bit, without a copy."""
    if lanes != 1:
        raise ConcordiaError(f"DLPack tensors of {lanes}-lane vectors cannot be wrapped: "
                             "regions hold one value per element")
    if bits % 8 or not bits:
        raise ConcordiaError(f"DLPack dtype code {code} has {bits}-bit elements; regions hold "
                             "whole bytes (pack sub-byte types into uint8 first)")
    if code in _NUMPY_KINDS:
        try:
            return np.dtype(f"{_NUMPY_KINDS[code]}{bits // 8}")
        except TypeError:
            pass          # e.g. float8: no numpy type of that kind and width
    return np.dtype(f"u{bits // 8}")


def device_text(view: "DLPackView") -> str:
    name = KDL_DEVICE_NAMES.get(view.device_type, f"DLPack device type {view.device_type}")
    return f"{name}:{view.device_id}"


@dataclass
class DLPackView:
    pointer: int
    device_type: int
    device_id: int
    dtype: np.dtype
    size: int
    capsule: object   # keeps the producer's memory alive


def read_dlpack(obj) -> DLPackView:
    if not hasattr(obj, "__dlpack__"):
        raise ConcordiaError(f"{type(obj).__name__} does not support DLPack (__dlpack__)")
    capsule = obj.__dlpack__()
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    t = _DLTensor.from_address(get(capsule, b"dltensor"))
    shape = [t.shape[i] for i in range(t.ndim)]
    if t.strides:
        expected, contiguous = 1, True
        for i in reversed(range(t.ndim)):
            if shape[i] != 1 and t.strides[i] != expected:
                contiguous = False
            expected *= shape[i]
        if not contiguous:
            raise ConcordiaError("only contiguous tensors can be wrapped as regions")
    dtype = region_dtype(t.dtype.code, t.dtype.bits, t.dtype.lanes)
    return DLPackView((t.data or 0) + t.byte_offset, t.device.device_type, t.device.device_id,
                      dtype, int(np.prod(shape)) if shape else 1, capsule)
