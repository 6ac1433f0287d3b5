"""Reading untrusted pickles (the official checkpoints) without executing anything they name.

A pickle is a small program: its GLOBAL opcodes import callables and REDUCE calls them. This
unpickler resolves only a short allow-list of pure data constructors (numpy arrays and dtypes,
built-in containers). Every other global -- flax/optax/jax classes, cloudpickle's function builders,
`os.system`, `builtins.eval` -- becomes an inert `Opaque` placeholder: calling it, instantiating it or
setting its state only records the arguments. The caller then finds the data it wants by structure.
"""

from __future__ import annotations

import collections
import functools
import io
import math
import pickle
from typing import Any

import numpy as np


class _RecordState:
    """`__setstate__` that works on placeholder classes and their instances alike (pickle's BUILD may
    target either, since calling a placeholder returns a new placeholder class)."""

    def __get__(self, obj: Any, owner: type) -> Any:
        target = owner if obj is None else obj

        def setstate(state: Any) -> None:
            target._opaque_state = state

        return setstate


class OpaqueMeta(type):
    """Calling a placeholder class yields another placeholder class (a type, so pickle's NEWOBJ can
    use it as a class later, as cloudpickle does with classes it rebuilt)."""

    def __call__(cls, *args: Any, **kwargs: Any) -> "OpaqueMeta":
        namespace = {"_opaque_name": f"{cls._opaque_name}(...)", "_opaque_args": args, "_opaque_kwargs": kwargs}
        return OpaqueMeta(f"{cls.__name__}()", (Opaque,), namespace)

    def __repr__(cls) -> str:
        return f"<opaque {cls._opaque_name}>"


class Opaque(metaclass=OpaqueMeta):
    _opaque_name = "?"
    _opaque_args: tuple = ()
    _opaque_kwargs: dict = {}
    _opaque_state: Any = None
    __setstate__ = _RecordState()

    def __new__(cls, *args: Any, **kwargs: Any) -> "Opaque":
        instance = object.__new__(cls)
        instance._opaque_args = args
        instance._opaque_items = {}
        instance._opaque_list = []
        return instance

    def __call__(self, *args: Any, **kwargs: Any) -> OpaqueMeta:
        return type(self)(*args, **kwargs)

    def __setitem__(self, key: Any, value: Any) -> None:
        self._opaque_items[key] = value

    def append(self, value: Any) -> None:
        self._opaque_list.append(value)

    def extend(self, values: Any) -> None:
        self._opaque_list.extend(values)

    def __repr__(self) -> str:
        return f"<opaque instance of {type(self)._opaque_name}>"


def _opaque_global(module: str, name: str) -> OpaqueMeta:
    return OpaqueMeta(name, (Opaque,), {"_opaque_name": f"{module}.{name}"})


def _check_array_size(shape: Any, dtype: np.dtype, limit: int) -> None:
    """Refuses, before any allocation, an array the file cannot hold: its data comes from the
    pickle itself, so neither its elements nor its bytes can outnumber the pickle's bytes."""
    if isinstance(shape, int):
        shape = (shape,)
    if not isinstance(shape, tuple) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise pickle.UnpicklingError(f"array shape {shape!r}: not a tuple of sizes")
    elements = math.prod(shape)
    if max(elements, elements * dtype.itemsize) > limit:
        raise pickle.UnpicklingError(
            f"array of shape {shape} {dtype} ({elements * dtype.itemsize} bytes) is larger than the "
            f"{limit}-byte file could hold")


def _frombuffer(buffer: Any, dtype: np.dtype, shape: tuple, order: str, *, limit: int) -> np.ndarray:
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise pickle.UnpicklingError("object arrays are refused")
    if not isinstance(buffer, (bytes, bytearray, memoryview)):  # bytes(10**12) would allocate a TB
        raise pickle.UnpicklingError(f"array buffer of type {type(buffer).__name__} refused")
    _check_array_size(shape, dtype, limit)
    return np.frombuffer(bytes(buffer), dtype=dtype).reshape(shape, order=order).copy()


def _ndarray_class(*args: Any, **kwargs: Any) -> None:
    """What the global `numpy.ndarray` resolves to: an argument of `_reconstruct`, never a call. Called
    directly it would build a view of other memory (zero strides: 1.5 KB of pickle claimed 2 GB)."""
    raise pickle.UnpicklingError("numpy.ndarray(...) called directly (an array view) is refused")


def _reconstruct(cls: Any, shape: Any, typecode: Any, *, limit: int) -> np.ndarray:
    # numpy's protocol <= 4 path: an empty ndarray whose BUILD (ndarray.__setstate__) fills the data
    if cls is not _ndarray_class:
        raise pickle.UnpicklingError(f"refusing to rebuild an array of class {cls!r}")
    _check_array_size(shape, np.dtype(typecode), limit)
    return np.ndarray.__new__(np.ndarray, shape, typecode)


def _byte_string(kind: type, *args: Any, limit: int) -> bytes | bytearray:
    # bytes(n) / bytearray(n) allocate n zero bytes: refuse sizes the file cannot account for
    if args and isinstance(args[0], int) and args[0] > limit:
        raise pickle.UnpicklingError(f"{kind.__name__}({args[0]}) is larger than the {limit}-byte file")
    return kind(*args)


def _scalar(dtype: np.dtype, data: bytes | None = None) -> Any:
    dtype = np.dtype(dtype)
    if dtype.hasobject or data is None:
        raise pickle.UnpicklingError("object scalars are refused")
    return np.frombuffer(data, dtype=dtype)[0]


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    # protocol 2 stores bytes as `_codecs.encode(text, "latin1")`
    if not isinstance(text, str) or encoding.replace("-", "") != "latin1":
        raise pickle.UnpicklingError("only latin-1 byte strings are accepted from _codecs.encode")
    return text.encode("latin1")


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    # copyreg's protocol 0/1 object rebuild; only placeholders and plain containers may be built
    if isinstance(cls, OpaqueMeta):
        return cls.__new__(cls)
    if cls in (dict, collections.OrderedDict, list):
        return cls(state) if state is not None else cls()
    raise pickle.UnpicklingError(f"refusing copyreg._reconstructor for {cls!r}")


_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): _ndarray_class,
    ("numpy", "dtype"): np.dtype,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("_codecs", "encode"): _latin1_bytes,
    **{("builtins", t.__name__): t for t in (dict, list, tuple, set, frozenset, int, float, complex, bool, str, bytes, bytearray)},
    **{("__builtin__", t.__name__): t for t in (dict, list, tuple, set, frozenset, int, float, complex, bool, str, bytes, bytearray)},
}
# numpy 1.x pickles name `numpy.core`, numpy 2.x `numpy._core`
for _core in ("numpy.core", "numpy._core"):
    _SAFE_GLOBALS[(f"{_core}.multiarray", "_reconstruct")] = _reconstruct
    _SAFE_GLOBALS[(f"{_core}.multiarray", "scalar")] = _scalar
    _SAFE_GLOBALS[(f"{_core}.numeric", "_frombuffer")] = _frombuffer


# Constructors whose allocation size comes from the file: bound to the file's size per unpickler.
_SIZED = {_frombuffer, _reconstruct, bytes, bytearray}


class SafeUnpickler(pickle._Unpickler):
    """The pure-Python unpickler: its memo is a dict, where the C one grows an array to the largest
    memo index a file names (a 9-byte pickle with index 2^27 took 2 GB). It also walks opcodes in a
    loop, never recursing, and a checkpoint is a few thousand opcodes around large byte strings."""

    def __init__(self, file: Any, max_bytes: int) -> None:
        super().__init__(file)
        self.max_bytes = max_bytes

    def find_class(self, module: str, name: str) -> Any:
        safe = _SAFE_GLOBALS.get((module, name))
        if safe in (bytes, bytearray):
            return functools.partial(_byte_string, safe, limit=self.max_bytes)
        if safe in _SIZED:
            return functools.partial(safe, limit=self.max_bytes)
        if safe is not None:
            return safe
        return _opaque_global(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids (e.g. torch.save archives) are not supported here")


def safe_load(data: bytes | bytearray) -> Any:
    """Unpickles `data` with every non-data global replaced by an inert placeholder and every
    array or byte string bounded by the size of `data`."""
    return SafeUnpickler(io.BytesIO(data), max_bytes=len(data)).load()


def opaque_fields(obj: Any) -> dict[str, Any] | None:
    """The recorded attribute dict of a placeholder (its BUILD state), if it has one."""
    if isinstance(obj, (Opaque, OpaqueMeta)):
        state = obj._opaque_state
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            state = {**(state[0] or {}), **state[1]}  # (dict state, slots state)
        if isinstance(state, dict):
            return state
        items = getattr(obj, "_opaque_items", None)
        if items:
            return items
    return None
