"""Reading pickles of numpy arrays from files nobody vouches for, in bounded memory and time.

``pickle`` runs whatever a file names, and even its harmless parts can cost without bound: a few
hundred bytes of memo references build lists aliased 2**60 times over (cheap to load,
exponential to walk), a tuple of such tuples used as a dict key is hashed in exponential time,
a ``LONG_BINPUT`` with a huge index makes the C unpickler allocate and clear a memo table that
large, a counted bytes opcode allocates the length it claims, and numpy's ``_reconstruct``
allocates whatever shape it is given (4 TiB from a 100-byte file). So :func:`load_pickle` reads a
file in three steps:

1. The file's size is capped (:data:`MAX_FILE_BYTES`) before it is read.
2. A scan of its opcodes (``pickletools.genops``, which reads a claimed length without
   allocating it) runs a small model of the unpickler's stack that knows only each object's
   kind. It admits only the opcodes that numpy arrays and plain containers need, at most
   :data:`MAX_OPCODES` of them, memo indices below the opcode count, and only short strings,
   bytes and numbers as dict keys. Everything the unpickler then does is linear in the file.
3. The C unpickler runs with a ``find_class`` that hands out stand-ins instead of numpy's
   constructors: :class:`PickledArray` and a dtype record check what the pickle claims (plain
   numeric dtypes only, at most :data:`MAX_ARRAY_BYTES`, exactly the bytes the shape needs
   present in the file) and allocate nothing beyond the file's own bytes. Numpy never sees the
   file's state; :meth:`PickledArray.array` builds the array from checked parts.

The caller then checks the structure it expects by type, without walking it (a list of lists
may be aliased exponentially): see ``srdxai.data.originals.CIFAR100``.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import re
from math import prod
from pathlib import Path
from typing import Any

import numpy as np

from srdxai.errors import InvalidInputError

__all__ = ["MAX_ARRAY_BYTES", "MAX_FILE_BYTES", "MAX_OPCODES", "PickledArray", "load_pickle"]

#: Largest file read (CIFAR-100's python ``train`` file is about 155 MiB, ``test`` 31 MiB).
MAX_FILE_BYTES = 512 * 2**20
#: Largest array a pickle may describe (an array's bytes must be in the file anyway).
MAX_ARRAY_BYTES = 512 * 2**20
#: Most opcodes read (CIFAR-100's ``train`` file has about 200,000; one written by Python 3 with
#: protocol 2 and bytes file names about 500,000). The scan takes about a second per million.
MAX_OPCODES = 2_000_000
# Strings, bytes and integers up to this length may be dict keys: comparing or hashing two keys
# then costs little, however often the memo repeats them.
_MAX_KEY_LENGTH = 1024
_MAX_NDIM = 32
# Plain numeric dtypes, as numpy pickles them (``np.dtype('u1', False, True)``).
_DTYPE_SPEC = re.compile(r"[<>|=]?(?:b1|[iu][1248]|f[248]|c(?:8|16))")
_TYPECODES = frozenset("?bBhHiIlLqQefdFD")


class _Refused(pickle.UnpicklingError):
    """Something the bounded reader does not read."""


def _human(n: int) -> str:
    size, unit = float(n), "bytes"
    for bigger in ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{n} bytes" if unit == "bytes" else f"{size:.1f} {unit}"


def _text(value: object) -> object:
    # Python 2 pickles read with encoding="bytes" give their str as bytes
    return value.decode("latin-1") if isinstance(value, bytes) else value


def _show(value: object) -> str:
    # Never repr() what a pickle built: the repr of aliased nested containers is exponential.
    if isinstance(value, str | bytes):
        return repr(value[:40]) + ("..." if len(value) > 40 else "")
    return f"a {type(value).__name__}"


def _shape(value: object) -> tuple[int, ...]:
    if (not isinstance(value, tuple) or len(value) > _MAX_NDIM
            or not all(type(v) is int and v >= 0 for v in value)):
        raise _Refused(f"an array's shape must be a tuple of at most {_MAX_NDIM} non-negative "
                       f"integers, not {type(value).__name__}")
    return value


def _claim(shape: tuple[int, ...], dtype: np.dtype) -> int:
    """Bytes an array of ``shape`` and ``dtype`` needs; refused above MAX_ARRAY_BYTES."""
    nbytes = prod(shape) * dtype.itemsize  # Python integers: no overflow to wrap it small
    if nbytes > MAX_ARRAY_BYTES:
        raise _Refused(f"an array claims {_human(nbytes)} (shape {shape} of {dtype}); arrays "
                       f"over {_human(MAX_ARRAY_BYTES)} are not read")
    return nbytes


class _NdarrayType:
    """Stands for ``numpy.ndarray`` (the class argument of ``_reconstruct``)."""

    def __repr__(self) -> str:
        return "numpy.ndarray"


_NDARRAY = _NdarrayType()


class _Dtype:
    """Stands for ``numpy.dtype(spec, align, copy)``; its state may only set the byte order."""

    __slots__ = ("dtype",)

    def __init__(self, spec: object, align: object = False, copy: object = True) -> None:
        spec = _text(spec)
        if not isinstance(spec, str) or not _DTYPE_SPEC.fullmatch(spec):
            raise _Refused(f"refusing numpy dtype {_show(spec)}: only plain numeric dtypes are "
                           "read")
        self.dtype = np.dtype(spec)

    def __setstate__(self, state: object) -> None:
        # numpy: (version, byte order, subarray, names, fields, itemsize, alignment, flags
        # [, metadata]); a plain numeric dtype has None or numbers after the byte order.
        if not isinstance(state, tuple) or not 2 <= len(state) <= 9:
            raise _Refused("a numpy dtype's state is not a tuple of 2 to 9 items")
        order = _text(state[1])
        if order not in ("<", ">", "|", "="):
            raise _Refused(f"a numpy dtype's byte order is {_show(order)}")
        for item in state[2:]:
            if not (item is None or type(item) in (int, bool)
                    or (isinstance(item, dict) and not item)):
                raise _Refused("refusing a numpy dtype with fields, a subarray or metadata: "
                               "only plain numeric dtypes are read")
        if order in "<>" and self.dtype.itemsize > 1:
            self.dtype = self.dtype.newbyteorder(order)


class PickledArray:
    """A numpy array as a pickle describes it: checked, built by :meth:`array`."""

    __slots__ = ("shape", "dtype", "fortran", "data")

    def __init__(self) -> None:
        self.shape: tuple[int, ...] | None = None
        self.dtype: np.dtype | None = None
        self.fortran = False
        self.data: bytes | bytearray = b""

    def _fill(self, shape: object, dtype: object, fortran: object, data: object) -> None:
        shape = _shape(shape)
        if not isinstance(dtype, _Dtype):
            raise _Refused(f"an array's dtype is a {type(dtype).__name__}, not a numpy dtype")
        nbytes = _claim(shape, dtype.dtype)
        if isinstance(data, str):  # numpy's Python 2 pickles, read as text
            data = data.encode("latin-1")
        if not isinstance(data, bytes | bytearray):
            raise _Refused(f"an array's data is a {type(data).__name__}, not bytes")
        if len(data) != nbytes:
            raise _Refused(f"an array of shape {shape} and dtype {dtype.dtype} needs "
                           f"{_human(nbytes)} but the file holds {_human(len(data))} for it")
        if type(fortran) not in (bool, int):
            raise _Refused("an array's memory order is not a flag")
        self.shape, self.dtype, self.fortran, self.data = shape, dtype.dtype, bool(fortran), data

    def __setstate__(self, state: object) -> None:
        # numpy: (version, shape, dtype, is_fortran, data); very old pickles lack the version
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise _Refused("a numpy array's state is not a tuple of 4 or 5 items")
        self._fill(*state[-4:])

    def array(self) -> np.ndarray:
        """The array (a read-only view of the file's bytes)."""
        if self.shape is None or self.dtype is None:
            raise InvalidInputError("the pickle describes an array but gives none of its data")
        flat = np.frombuffer(self.data, dtype=self.dtype)
        return flat.reshape(self.shape, order="F" if self.fortran else "C")


def _reconstruct(subtype: object, shape: object, typecode: object) -> PickledArray:
    # numpy allocates ``shape`` of ``typecode`` here before __setstate__ replaces it: the
    # claim is checked as if it were kept (numpy itself always writes shape (0,) and 'b').
    if subtype is not _NDARRAY:
        raise _Refused("only plain numpy arrays are read")
    code = _text(typecode)
    if not isinstance(code, str) or not (code in _TYPECODES or _DTYPE_SPEC.fullmatch(code)):
        raise _Refused(f"refusing numpy type code {_show(typecode)}")
    _claim(_shape(shape), np.dtype(code))
    return PickledArray()


def _frombuffer(data: object, dtype: object, shape: object, order: object) -> PickledArray:
    # protocol 5's route for contiguous arrays
    if _text(order) not in ("C", "F"):
        raise _Refused(f"an array's memory order is {_show(order)}")
    out = PickledArray()
    out._fill(shape, dtype, _text(order) == "F", data)
    return out


def _scalar(dtype: object, data: object = None) -> Any:
    if not isinstance(dtype, _Dtype):
        raise _Refused("a numpy scalar's dtype is not a numpy dtype")
    if isinstance(data, str):
        data = data.encode("latin-1")
    if not isinstance(data, bytes) or len(data) != dtype.dtype.itemsize:
        raise _Refused(f"a numpy scalar of {dtype.dtype} does not hold "
                       f"{dtype.dtype.itemsize} bytes")
    return np.frombuffer(data, dtype=dtype.dtype)[0]


def _encode(text: object, encoding: object = "utf-8", errors: object = "strict") -> bytes:
    # Python 3 writes bytes under protocol 2 as _codecs.encode(str, 'latin1'); other codecs
    # (hex, base64, ...) could grow a string at every call, so only that one is run.
    if not isinstance(text, str) or _text(encoding) not in ("latin1", "latin-1", "iso-8859-1",
                                                             "iso8859-1"):
        raise _Refused("refusing _codecs.encode other than a string to latin-1")
    return text.encode("latin-1")


def _empty_bytes(*args: object) -> bytes:
    # Python 3 writes b"" under protocol 2 as bytes(); bytes(n) would allocate n bytes
    if args:
        raise _Refused("refusing bytes() with arguments")
    return b""


_STAND_INS: dict[tuple[str, str], object] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _Dtype,
    ("_codecs", "encode"): _encode,
    ("__builtin__", "bytes"): _empty_bytes,
    ("builtins", "bytes"): _empty_bytes,
}


class _StandInUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        try:
            return _STAND_INS[(module, name)]
        except (KeyError, TypeError):
            raise _Refused(f"refusing to load {module}.{name} from a data file") from None


# --- the opcode scan ---------------------------------------------------------------------------

# What the model of the stack knows of an object: its kind, and for a short string its value
# (STACK_GLOBAL names come from the stack) and for a tuple its items' entries.
_KEY, _LONG, _TUPLE, _LIST, _DICT, _GLOBAL, _OBJECT = range(7)
_KIND_NAMES = ("short string or number", "long string or number", "tuple", "list", "dict",
               "global", "object")
_NUMBERS = frozenset({"NONE", "NEWTRUE", "NEWFALSE", "INT", "BININT", "BININT1", "BININT2",
                      "LONG", "LONG1", "FLOAT", "BINFLOAT"})
_STRINGS = frozenset({"STRING", "BINSTRING", "SHORT_BINSTRING", "BINBYTES", "SHORT_BINBYTES",
                      "BINBYTES8", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE",
                      "BINUNICODE8"})
_PUTS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_GETS = frozenset({"GET", "BINGET", "LONG_BINGET"})


def _scan(raw: bytes) -> None:
    """Refuse ``raw`` unless unpickling it is linear in its size (see the module doc)."""
    stack: list[tuple[int, Any]] = []
    marks: list[int] = []
    memo: dict[int, tuple[int, Any]] = {}

    def take(n: int) -> list[tuple[int, Any]]:
        floor = marks[-1] if marks else 0
        if len(stack) - n < floor:
            raise _Refused("malformed pickle: the stack runs out")
        items = stack[len(stack) - n:]
        del stack[len(stack) - n:]
        return items

    def to_mark() -> list[tuple[int, Any]]:
        if not marks:
            raise _Refused("malformed pickle: no MARK")
        start = marks.pop()
        items = stack[start:]
        del stack[start:]
        return items

    def target(kind: int, op: str) -> None:
        floor = marks[-1] if marks else 0
        if len(stack) <= floor or stack[-1][0] != kind:
            raise _Refused(f"{op} applies to a {_KIND_NAMES[kind]} only")

    def keys(entries: list[tuple[int, Any]]) -> None:
        for kind, _ in entries:
            if kind != _KEY:
                raise _Refused(f"a dict key is a {_KIND_NAMES[kind]}; only strings, bytes and "
                               f"numbers of at most {_MAX_KEY_LENGTH} characters are read")

    count = 0
    for op, arg, _pos in pickletools.genops(io.BytesIO(raw)):
        count += 1
        if count > MAX_OPCODES:
            raise _Refused(f"more than {MAX_OPCODES:,} pickle opcodes")
        name = op.name
        if name in _NUMBERS:
            stack.append((_KEY, None))
        elif name in _STRINGS:
            short = len(arg) <= _MAX_KEY_LENGTH
            stack.append((_KEY, arg if isinstance(arg, str) else None) if short else (_LONG, None))
        elif name == "LONG4":
            stack.append((_KEY if arg.bit_length() <= 8 * _MAX_KEY_LENGTH else _LONG, None))
        elif name == "BYTEARRAY8":
            stack.append((_OBJECT, None))
        elif name in ("PROTO", "FRAME", "STOP"):
            pass
        elif name == "MARK":
            marks.append(len(stack))
        elif name == "POP":
            if marks and marks[-1] == len(stack):
                marks.pop()
            else:
                take(1)
        elif name == "POP_MARK":
            to_mark()
        elif name == "DUP":
            stack.append(take(1)[0])
            stack.append(stack[-1])
        elif name == "EMPTY_TUPLE":
            stack.append((_TUPLE, ()))
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            stack.append((_TUPLE, tuple(take(int(name[-1])))))
        elif name == "TUPLE":
            stack.append((_TUPLE, tuple(to_mark())))
        elif name == "EMPTY_LIST":
            stack.append((_LIST, None))
        elif name == "LIST":
            to_mark()
            stack.append((_LIST, None))
        elif name == "EMPTY_DICT":
            stack.append((_DICT, None))
        elif name == "DICT":
            items = to_mark()
            keys(items[0::2])
            stack.append((_DICT, None))
        elif name == "APPEND":
            take(1)
            target(_LIST, name)
        elif name == "APPENDS":
            to_mark()
            target(_LIST, name)
        elif name == "SETITEM":
            keys(take(2)[:1])
            target(_DICT, name)
        elif name == "SETITEMS":
            keys(to_mark()[0::2])
            target(_DICT, name)
        elif name == "GLOBAL":
            stack.append((_GLOBAL, arg))
        elif name == "STACK_GLOBAL":
            module, attr = take(2)
            if module[1] is None or attr[1] is None:
                raise _Refused("STACK_GLOBAL names are not short strings")
            stack.append((_GLOBAL, f"{module[1]} {attr[1]}"))
        elif name == "REDUCE":
            func, args = take(2)
            if func[0] != _GLOBAL or args[0] != _TUPLE:
                raise _Refused("REDUCE calls something other than a named global")
            if func[1] in ("__builtin__ bytes", "builtins bytes"):
                stack.append((_KEY, None))
            elif func[1] == "_codecs encode":
                # its result is bytes as long as the string: a key when the string is short
                short = bool(args[1]) and args[1][0][0] == _KEY
                stack.append((_KEY, None) if short else (_LONG, None))
            else:
                stack.append((_OBJECT, None))
        elif name == "BUILD":
            take(1)
            target(_OBJECT, name)
        elif name in _PUTS or name == "MEMOIZE":
            index = len(memo) if name == "MEMOIZE" else arg
            # The C unpickler sizes its memo table by the largest index; a pickler numbers
            # them from 0, one per opcode at most.
            if index >= count:
                raise _Refused(f"memo index {index} out of range")
            if not stack or (marks and marks[-1] == len(stack)):
                raise _Refused("malformed pickle: nothing to memoize")
            memo[index] = stack[-1]
        elif name in _GETS:
            if arg not in memo:
                raise _Refused(f"malformed pickle: memo index {arg} was never set")
            stack.append(memo[arg])
        else:
            raise _Refused(f"refusing pickle opcode {name}: numpy arrays and plain containers "
                           "do not need it")


def load_pickle(path: str | Path, what: str = "pickle file") -> object:
    """The object pickled in ``path``, read within the limits of this module; numpy arrays come
    back as :class:`PickledArray` (``.array()`` builds one).

    Raises :class:`~srdxai.errors.InvalidInputError` naming ``what`` and ``path`` for a file
    that is too large, malformed, or asks for anything beyond numpy arrays of plain numeric
    dtypes, numbers, strings, bytes, tuples, lists and dicts.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise _Refused(f"the file has {_human(size)}; files over {_human(MAX_FILE_BYTES)} "
                           "are not read")
        with path.open("rb") as handle:
            raw = handle.read(MAX_FILE_BYTES + 1)
        if len(raw) > MAX_FILE_BYTES:  # it grew since stat
            raise _Refused(f"the file has over {_human(MAX_FILE_BYTES)}, the most read")
        _scan(raw)
        return _StandInUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except OSError as exc:
        raise InvalidInputError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    except Exception as exc:  # a malformed pickle raises many types; each is the file's fault
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise InvalidInputError(f"cannot read {what} {path}: {reason}") from exc
