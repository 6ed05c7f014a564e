"""Convert Python values to JSON text and back, driven by type annotations.

Every payload perdure stores (orchestration and activity inputs and results, event data, custom
status) is JSON text written by :func:`dumps` and read back by :func:`loads`. JSON because a person
can read it in the database, another language can read it, and reading it runs no code: perdure
never pickles, since an unpickled payload executes whatever its writer chose and breaks as soon as
a class is renamed or moved.

:func:`dumps` looks at the value: JSON types, dataclasses (recursively), enums (by value),
``datetime``/``date``/``time`` (ISO 8601, aware datetimes keep their UTC offset), ``timedelta``
(seconds as a float), ``UUID``, ``Decimal`` (as a string), ``bytes`` (base64), tuples and sets (as
lists; sets sorted so equal sets give equal text), mappings with string keys and pydantic v2 models.
Anything else, a NaN or an infinity fails at once with a :class:`SerializationError` that names the
payload, the path inside it and the Python type: a bad payload is reported where the user passed
it, not when the runtime stores it.

:func:`loads` looks at the annotation: ``loads(text, Order)`` gives back an ``Order``, nested
dataclasses, enums, datetimes, ``list[T]``, ``dict[str, T]``, unions, ``Literal`` and so on
included. Unknown keys of a dataclass are ignored and missing ones take their defaults, so stored
history stays readable after fields are added or removed.

Both directions are on the hot path of every activity call, so the converter for each type is
built once and cached, and plain JSON values (scalars, flat lists and dicts) go straight to the
C encoder.

A :class:`Codec` transforms stored bytes (compression, encryption); a :class:`CodecChain` applies
several in order. :func:`dumps` and :func:`loads` always work on plain text: the runtime applies
the chain when it stores a payload.
"""

from __future__ import annotations

import base64
import binascii
import collections.abc as cabc
import dataclasses
import datetime as dt
import decimal
import enum
import json
import math
import re
import sys
import threading
import types
import typing
import uuid
import zlib
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

_Convert = Callable[[Any], Any]
_T = typing.TypeVar("_T")
_NoneType = type(None)
_MISSING: Any = object()

#: Types the C encoder writes as they are; also the "flat" element types of the fast path.
_SCALARS = frozenset({str, int, float, bool, _NoneType})
_STR = frozenset({str})
_TODO = "convert it to a JSON type, a dataclass or a pydantic model"

_ENCODE = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, check_circular=False, separators=(",", ":")
).encode
#: Used when a string holds a lone surrogate: escaped, the text is still valid UTF-8 to store.
_ENCODE_ASCII = json.JSONEncoder(
    ensure_ascii=True, allow_nan=False, check_circular=False, separators=(",", ":")
).encode
_SURROGATE = re.compile("[\ud800-\udfff]")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_DECODE = json.JSONDecoder(parse_constant=_reject_constant).decode


class SerializationError(TypeError):
    """A value cannot be written as JSON, or JSON text does not fit the expected type.

    ``what`` names the payload (``"input of activity 'charge_card'"``) and ``path`` the place
    inside it (``"order.items[2].price"``, empty for the value itself).
    """

    def __init__(self, message: str, *, what: str = "value", path: str = "") -> None:
        super().__init__(message)
        self.what = what
        self.path = path


class _Fail(Exception):
    """Raised inside converters; each container adds its path segment while it unwinds.

    Collecting the path on the way out keeps the success path free of bookkeeping.
    """

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.segments: list[str] = []  # leaf first


class _Unsupported(Exception):
    """An annotation :func:`loads` cannot convert to; raised while building a converter."""


def _join_path(segments: list[str]) -> str:
    return "".join(segments).removeprefix(".")


def _error(verb: str, what: str, fail: _Fail) -> SerializationError:
    path = _join_path(fail.segments[::-1])
    if verb == "serialise":  # "order.items[2].price has type object, ..."
        where = f"{path} " if path else "the value itself "
    else:  # "at items[1].price: expected Decimal, got boolean true"
        where = f"at {path}: " if path else ""
    return SerializationError(f"cannot {verb} {what}: {where}{fail.problem}", what=what, path=path)


def _key_segment(key: str) -> str:
    return f".{key}" if key.isidentifier() else f"[{_ENCODE(key)}]"


def _type_name(cls: type[Any]) -> str:
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def _type_repr(tp: object) -> str:
    if isinstance(tp, type):
        return tp.__qualname__
    if tp is None:
        return "None"
    return repr(tp).replace("typing.", "")


# --------------------------------------------------------------------------------------------
# Python value -> JSON value
# --------------------------------------------------------------------------------------------


def dumps(value: object, *, what: str = "value") -> str:
    """Return ``value`` as compact JSON text; raise :class:`SerializationError` if it has no JSON form.

    ``what`` names the value in error messages, e.g. ``"input of activity 'charge_card'"``.
    """
    cls = value.__class__
    obj: Any = _MISSING
    try:
        if (
            cls in _SCALARS
            or (cls is list and _SCALARS.issuperset(map(type, value)))  # type: ignore[call-overload]
            or (
                cls is dict
                and _STR.issuperset(map(type, value))  # type: ignore[call-overload]
                and _SCALARS.issuperset(map(type, value.values()))  # type: ignore[attr-defined]
            )
        ):
            obj = value
        else:
            obj = _to_json(value)
        text = _ENCODE(obj)
    except _Fail as fail:
        raise _error("serialise", what, fail) from None
    except ValueError:  # only NaN and infinities reach the encoder unchecked
        segments = None if obj is _MISSING else _find_nonfinite(obj)
        if segments is None:  # pragma: no cover - a ValueError from user code
            raise
        nonfinite = _Fail("is a float that is NaN or infinite, which JSON cannot hold; use None or a string")
        nonfinite.segments = segments[::-1]
        raise _error("serialise", what, nonfinite) from None
    except RecursionError:
        raise SerializationError(
            f"cannot serialise {what}: it is nested too deeply or contains itself", what=what
        ) from None
    if not text.isascii() and _SURROGATE.search(text) is not None:
        text = _ENCODE_ASCII(obj)
    return text


def _to_json(value: Any) -> Any:
    cls = value.__class__
    if cls in _SCALARS:
        return value
    encode = _ENCODERS.get(cls)
    if encode is None:
        encode = _ENCODERS[cls] = _build_encoder(cls)
    return encode(value)


def _find_nonfinite(obj: Any) -> list[str] | None:
    """Return the path (root first) to the first NaN or infinity in a JSON tree, or ``None``."""
    if obj.__class__ is float:
        return None if math.isfinite(obj) else []
    if isinstance(obj, dict):
        for key, item in obj.items():
            found = _find_nonfinite(item)
            if found is not None:
                return [_key_segment(key), *found]
    elif isinstance(obj, list):
        for index, item in enumerate(obj):
            found = _find_nonfinite(item)
            if found is not None:
                return [f"[{index}]", *found]
    return None


def _dict_key(key: Any) -> str:
    if isinstance(key, str):
        return key.value if isinstance(key, enum.Enum) else str(key)
    if isinstance(key, enum.Enum) and isinstance(key.value, str):
        return key.value
    raise _Fail(
        f"has a key {key!r} of type {_type_name(type(key))}; mapping keys must be strings: "
        "convert the keys with str() or send a list of pairs"
    )


def _enc_mapping(value: cabc.Mapping[Any, Any]) -> dict[str, Any]:
    try:
        return {
            (k if k.__class__ is str else _dict_key(k)): (v if v.__class__ in _SCALARS else _to_json(v))
            for k, v in value.items()
        }
    except _Fail as fail:
        for k, v in value.items():
            key = k if k.__class__ is str else _dict_key(k)  # a bad key re-raises: path ends here
            try:
                _to_json(v)
            except _Fail:
                fail.segments.append(_key_segment(key))
                break
        raise


def _enc_sequence(value: cabc.Iterable[Any]) -> list[Any]:
    try:
        return [v if v.__class__ in _SCALARS else _to_json(v) for v in value]
    except _Fail as fail:
        for index, v in enumerate(value):
            try:
                _to_json(v)
            except _Fail:
                fail.segments.append(f"[{index}]")
                break
        raise


def _enc_set(value: cabc.Set[Any]) -> list[Any]:
    try:
        items = [_to_json(v) for v in value]
    except _Fail as fail:
        fail.segments.append("[*]")
        raise
    # Sorted so that equal sets give equal text whatever the hash seed: replay compares payloads.
    try:
        return sorted(items)
    except TypeError:
        return sorted(items, key=_ENCODE)


def _enc_float(value: float) -> float:
    return float(value)


def _enc_enum(value: enum.Enum) -> Any:
    try:
        return _to_json(value.value)
    except _Fail as fail:
        fail.segments.append(".value")
        raise


def _enc_isoformat(value: dt.date | dt.time) -> str:
    return value.isoformat()


def _enc_timedelta(value: dt.timedelta) -> float:
    return value.total_seconds()


def _enc_bytes(value: bytes | bytearray | memoryview) -> str:
    return base64.b64encode(value).decode("ascii")


def _dataclass_encoder(cls: type[Any]) -> _Convert:
    names = tuple(f.name for f in dataclasses.fields(cls))

    def encode(value: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in names:
            item = getattr(value, name)
            if item.__class__ not in _SCALARS:
                try:
                    item = _to_json(item)
                except _Fail as fail:
                    fail.segments.append(f".{name}")
                    raise
            out[name] = item
        return out

    return encode


def _enc_pydantic(value: Any) -> Any:
    try:
        dumped = value.model_dump(mode="json")
    except ValueError as exc:  # pydantic_core.PydanticSerializationError
        raise _Fail(f"is a {_type_name(type(value))} that pydantic cannot dump: {exc}") from None
    return _to_json(dumped)


def _unsupported_encoder(cls: type[Any]) -> _Convert:
    def encode(value: Any) -> Any:
        raise _Fail(f"has type {_type_name(cls)}, which has no JSON form; {_TODO}")

    return encode


def _pydantic_model_class() -> type[Any] | None:
    # A model's class can only exist once pydantic is imported, so never import it here.
    module = sys.modules.get("pydantic")
    base = getattr(module, "BaseModel", None)
    return base if isinstance(base, type) else None


def _build_encoder(cls: type[Any]) -> _Convert:
    if issubclass(cls, enum.Enum):
        return _enc_enum
    if issubclass(cls, int):
        return int
    if issubclass(cls, float):
        return _enc_float
    if issubclass(cls, str):
        return str
    if issubclass(cls, (dt.date, dt.time)):
        return _enc_isoformat
    if issubclass(cls, dt.timedelta):
        return _enc_timedelta
    if issubclass(cls, (uuid.UUID, decimal.Decimal)):
        return str
    if issubclass(cls, (bytes, bytearray, memoryview)):
        return _enc_bytes
    if dataclasses.is_dataclass(cls):
        return _dataclass_encoder(cls)
    model = _pydantic_model_class()
    if model is not None and issubclass(cls, model):
        return _enc_pydantic
    if issubclass(cls, cabc.Mapping):
        return _enc_mapping
    if issubclass(cls, (list, tuple)):
        return _enc_sequence
    if issubclass(cls, (set, frozenset)):
        return _enc_set
    return _unsupported_encoder(cls)


_ENCODERS: dict[type[Any], _Convert] = {
    dict: _enc_mapping,
    list: _enc_sequence,
    tuple: _enc_sequence,
}


# --------------------------------------------------------------------------------------------
# JSON value -> Python value
# --------------------------------------------------------------------------------------------

_JSON_KINDS = {
    dict: "object",
    list: "array",
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    _NoneType: "null",
}


def _mismatch(expected: object, data: Any) -> _Fail:
    kind = _JSON_KINDS.get(data.__class__, type(data).__name__)
    if data is None:
        return _Fail(f"expected {_type_repr(expected)}, got null")
    text = _ENCODE(data)
    if len(text) > 40:
        text = text[:37] + "..."
    return _Fail(f"expected {_type_repr(expected)}, got {kind} {text}")


def loads(text: str | bytes, tp: object = Any, *, what: str = "value") -> Any:
    """Parse JSON ``text`` and convert it to ``tp``; ``Any`` (the default) returns plain JSON values.

    Raises :class:`SerializationError` naming ``what``, the path and the expected type when the
    text is not JSON or does not fit ``tp``, or when ``tp`` is not an annotation it can convert to.
    """
    try:
        data = _DECODE(text if text.__class__ is str else _text(text, what))
    except ValueError as exc:
        raise SerializationError(f"cannot load {what}: not valid JSON ({exc})", what=what) from None
    if tp is Any or tp is object:
        return data
    try:
        return _decoder(tp)(data)
    except _Fail as fail:
        raise _error("load", what, fail) from None
    except _Unsupported as exc:
        raise SerializationError(f"cannot load {what}: {exc}", what=what) from None
    except RecursionError:
        raise SerializationError(f"cannot load {what}: it is nested too deeply", what=what) from None


def _text(text: object, what: str) -> str:
    if isinstance(text, (bytes, bytearray, memoryview)):
        return bytes(text).decode("utf-8")
    raise SerializationError(
        f"cannot load {what}: expected JSON text (str or bytes), got {_type_name(type(text))}", what=what
    )


# Decoders are cached twice. ``_BY_ID`` maps id(annotation) to (annotation, decoder): an identity
# hit is the common case, since annotations usually come from signatures and live as long as the
# program. ``_CACHE`` catches equal annotations built afresh (``list[int]`` is a new object each
# time it is written). Its key is structural and keeps the order of union members, because
# ``int | str == str | int`` while a union is tried in order. Builds run under ``_LOCK``; decoders
# being built (a dataclass may refer to itself) wait in ``_PENDING`` and are published only when
# the outermost build succeeds, so no thread ever sees a half-built decoder.
_BY_ID: dict[int, tuple[object, _Convert]] = {}
_BY_ID_MAX = 4096
_CACHE: dict[object, _Convert] = {}
_PENDING: dict[object, _Convert] = {}
_LOCK = threading.RLock()
_depth = 0  # nesting of builds in the thread holding _LOCK


def _decoder(tp: object) -> _Convert:
    hit = _BY_ID.get(id(tp))
    if hit is not None and hit[0] is tp:
        return hit[1]
    return _decoder_slow(tp)


def _structure(tp: object) -> object:
    if isinstance(tp, type):
        return tp
    args = getattr(tp, "__args__", None)
    if args is None or args.__class__ is not tuple:
        return tp
    # Non-type arguments (Literal values) carry their class: Literal[1] is not Literal[True].
    return (
        getattr(tp, "__origin__", None) or type(tp),
        tuple(
            [
                _structure(a) if hasattr(a, "__args__") or isinstance(a, type) else (a.__class__, a)
                for a in args
            ]
        ),
    )


def _cache_key(tp: object) -> object:
    key = _structure(tp)
    try:
        hash(key)
    except TypeError:  # e.g. unhashable Literal values: build every time
        return None
    return key


def _decoder_slow(tp: object) -> _Convert:
    global _depth
    key = _cache_key(tp)
    decode = None if key is None else _CACHE.get(key)  # published decoders are complete
    if decode is None:
        with _LOCK:
            decode = None if key is None else (_CACHE.get(key) or _PENDING.get(key))
            if decode is None:
                _depth += 1
                try:
                    decode = _build_decoder(tp, key)
                    if key is not None:
                        _PENDING[key] = decode
                except BaseException:
                    if _depth == 1:
                        _PENDING.clear()
                    raise
                finally:
                    _depth -= 1
                if _depth == 0:
                    _CACHE.update(_PENDING)
                    _PENDING.clear()
            if _depth > 0:  # part of an outer build: publish nothing yet
                return decode
    if len(_BY_ID) >= _BY_ID_MAX:
        _BY_ID.clear()
    _BY_ID[id(tp)] = (tp, decode)
    return decode


def _lookup(table: dict[object, _T], tp: object) -> _T | None:
    try:
        return table.get(tp)
    except TypeError:  # unhashable annotation
        return None


def _identity(data: Any) -> Any:
    return data


def _dec_none(data: Any) -> None:
    if data is not None:
        raise _mismatch(None, data)


def _dec_bool(data: Any) -> bool:
    if data.__class__ is bool:
        return bool(data)
    raise _mismatch(bool, data)


def _dec_int(data: Any) -> int:
    if data.__class__ is int:
        return int(data)
    raise _mismatch(int, data)


def _dec_float(data: Any) -> float:
    cls = data.__class__
    if cls is float:
        return float(data)
    if cls is int:
        try:
            return float(data)
        except OverflowError:
            pass
    raise _mismatch(float, data)


def _dec_str(data: Any) -> str:
    if data.__class__ is str:
        return str(data)
    raise _mismatch(str, data)


def _from_string(tp: type[Any], parse: Callable[[str], Any]) -> _Convert:
    def decode(data: Any) -> Any:
        if data.__class__ is str:
            try:
                return parse(data)
            except ValueError as exc:
                raise _Fail(f"expected {_type_repr(tp)}, got string {_ENCODE(data)} ({exc})") from None
        raise _mismatch(tp, data)

    return decode


def _dec_timedelta(tp: type[dt.timedelta]) -> _Convert:
    def decode(data: Any) -> dt.timedelta:
        if data.__class__ is int or data.__class__ is float:
            try:
                return tp(seconds=data)
            except OverflowError as exc:
                raise _Fail(f"expected {_type_repr(tp)}, got {data!r} seconds ({exc})") from None
        raise _mismatch(tp, data)

    return decode


def _dec_decimal(tp: type[decimal.Decimal]) -> _Convert:
    def decode(data: Any) -> decimal.Decimal:
        if data.__class__ is str or data.__class__ is int or data.__class__ is float:
            try:
                return tp(str(data))
            except decimal.InvalidOperation:
                pass
        raise _mismatch(tp, data)

    return decode


def _dec_bytes(tp: type[Any]) -> _Convert:
    def parse(data: str) -> Any:
        try:
            return tp(base64.b64decode(data, validate=True))
        except binascii.Error as exc:
            raise ValueError(f"not base64: {exc}") from None

    return _from_string(tp, parse)


def _dec_enum(tp: type[enum.Enum]) -> _Convert:
    def decode(data: Any) -> enum.Enum:
        try:
            return tp(data)
        except (ValueError, TypeError):
            if data.__class__ is list:  # a tuple value was written as a list
                try:
                    return tp(tuple(data))
                except (ValueError, TypeError):
                    pass
        allowed = ", ".join(_ENCODE(_to_json(m.value)) for m in tp)
        raise _Fail(f"expected {_type_repr(tp)} (one of {allowed}), got {_ENCODE(data)}")

    return decode


def _dec_scalar_subclass(tp: type[Any], base: type[Any]) -> _Convert:
    check = _SCALAR_DECODERS[base]

    def decode(data: Any) -> Any:
        try:
            return tp(check(data))
        except _Fail:
            raise _mismatch(tp, data) from None

    return decode


def _dec_list(item_tp: object, origin: type[Any], tp: object) -> _Convert:
    item = _decoder(item_tp)

    def decode(data: Any) -> Any:
        if data.__class__ is not list:
            raise _mismatch(tp, data)
        if item is _identity and origin is list:
            return data
        try:
            items = [item(x) for x in data]
        except _Fail as fail:
            for index, x in enumerate(data):
                try:
                    item(x)
                except _Fail:
                    fail.segments.append(f"[{index}]")
                    break
            raise
        if origin is list:
            return items
        try:
            return origin(items)
        except TypeError as exc:  # unhashable items for a set
            raise _Fail(f"could not create {_type_repr(tp)}: {exc}") from None

    return decode


def _dec_fixed_tuple(item_tps: tuple[object, ...], tp: object) -> _Convert:
    items = tuple(_decoder(t) for t in item_tps)
    size = len(items)

    def decode(data: Any) -> tuple[Any, ...]:
        if data.__class__ is not list:
            raise _mismatch(tp, data)
        if len(data) != size:
            raise _Fail(f"expected {_type_repr(tp)} ({size} items), got an array of {len(data)}")
        out = []
        for index, (convert, x) in enumerate(zip(items, data, strict=True)):
            try:
                out.append(convert(x))
            except _Fail as fail:
                fail.segments.append(f"[{index}]")
                raise
        return tuple(out)

    return decode


def _dec_dict(key_tp: object, value_tp: object, tp: object) -> _Convert:
    key = None if key_tp is str or key_tp is Any else _decoder(key_tp)
    value = _decoder(value_tp)

    def decode(data: Any) -> dict[Any, Any]:
        if data.__class__ is not dict:
            raise _mismatch(tp, data)
        if key is None and value is _identity:
            return data
        try:
            if key is None:
                return {k: value(v) for k, v in data.items()}
            return {key(k): value(v) for k, v in data.items()}
        except _Fail as fail:
            for k, v in data.items():
                if key is not None:
                    try:
                        key(k)
                    except _Fail:
                        fail.problem = f"a key does not fit: {fail.problem}"
                        break
                try:
                    value(v)
                except _Fail:
                    fail.segments.append(_key_segment(k))
                    break
            raise

    return decode


def _dec_union(members: tuple[object, ...], tp: object) -> _Convert:
    nullable = _NoneType in members
    decoders = tuple(_decoder(m) for m in members if m is not _NoneType)
    if len(decoders) == 1 and nullable:
        only = decoders[0]

        def optional(data: Any) -> Any:
            return None if data is None else only(data)

        return optional

    def decode(data: Any) -> Any:
        if data is None and nullable:
            return None
        failures = []
        for convert in decoders:
            try:
                return convert(data)
            except _Fail as fail:
                failures.append(fail)
        # The member that got furthest into the data explains the mismatch best.
        deepest = max(failures, key=lambda f: len(f.segments), default=None)
        if deepest is not None and deepest.segments:
            raise deepest
        raise _mismatch(tp, data)

    return decode


def _dec_literal(values: tuple[Any, ...], tp: object) -> _Convert:
    def decode(data: Any) -> Any:
        for value in values:
            plain = value.value if isinstance(value, enum.Enum) else value
            if data == plain and data.__class__ is plain.__class__:
                return value
        raise _mismatch(tp, data)

    return decode


def _type_hints(cls: type[Any]) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception as exc:  # NameError, TypeError: unresolvable string annotations
        raise _Unsupported(
            f"cannot resolve the annotations of {_type_repr(cls)} ({type(exc).__name__}: {exc}); "
            "define the classes it refers to at module level"
        ) from None


def _substitute(hint: object, mapping: dict[Any, Any]) -> object:
    if not mapping:
        return hint
    if isinstance(hint, typing.TypeVar):
        return mapping.get(hint, hint)
    params = getattr(hint, "__parameters__", ())
    if params:
        return hint[tuple(mapping.get(p, p) for p in params)]  # type: ignore[index]
    return hint


def _construct(cls: type[Any], kwargs: dict[str, Any]) -> Any:
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise _Fail(f"could not create {_type_repr(cls)}: {type(exc).__name__}: {exc}") from None


def _dec_dataclass(cls: type[Any], args: tuple[object, ...], key: object) -> _Convert:
    mapping = dict(zip(getattr(cls, "__parameters__", ()), args, strict=False))
    spec: list[tuple[str, type[Any] | None, _Convert, bool]] = []

    def decode(data: Any) -> Any:
        if data.__class__ is not dict:
            raise _mismatch(cls, data)
        kwargs = {}
        for name, exact, convert, required in spec:
            raw = data.get(name, _MISSING)
            if raw is _MISSING:
                if required:
                    raise _Fail(f"missing required field {name!r} of {_type_repr(cls)}")
                continue
            if raw.__class__ is exact:
                kwargs[name] = raw
                continue
            try:
                kwargs[name] = convert(raw)
            except _Fail as fail:
                fail.segments.append(f".{name}")
                raise
        return _construct(cls, kwargs)

    if key is not None:
        _PENDING[key] = decode  # a field may refer back to this class
    hints = _type_hints(cls)
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        hint = _substitute(hints.get(field.name, Any), mapping)
        try:
            convert = _decoder(hint)
        except _Unsupported as exc:
            raise _Unsupported(f"field {_type_repr(cls)}.{field.name}: {exc}") from None
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        spec.append((field.name, _lookup(_EXACT, hint), convert, required))
    return decode


def _dec_typeddict(tp: type[Any]) -> _Convert:
    fields = {name: _decoder(hint) for name, hint in _type_hints(tp).items()}
    required: frozenset[str] = tp.__required_keys__

    def decode(data: Any) -> dict[str, Any]:
        if data.__class__ is not dict:
            raise _mismatch(tp, data)
        for name in required:
            if name not in data:
                raise _Fail(f"missing required key {name!r} of {_type_repr(tp)}")
        out = {}
        for name, convert in fields.items():
            raw = data.get(name, _MISSING)
            if raw is not _MISSING:
                try:
                    out[name] = convert(raw)
                except _Fail as fail:
                    fail.segments.append(_key_segment(name))
                    raise
        return out

    return decode


def _dec_namedtuple(tp: type[Any]) -> _Convert:
    hints = _type_hints(tp)
    names: tuple[str, ...] = tp._fields
    items = tuple(_decoder(hints.get(name, Any)) for name in names)
    least = len(names) - len(tp._field_defaults)

    def decode(data: Any) -> Any:
        if data.__class__ is not list:
            raise _mismatch(tp, data)
        if not least <= len(data) <= len(names):
            raise _Fail(f"expected {_type_repr(tp)} ({len(names)} items), got an array of {len(data)}")
        out = []
        for name, convert, x in zip(names, items, data, strict=False):
            try:
                out.append(convert(x))
            except _Fail as fail:
                fail.segments.append(f".{name}")
                raise
        return tp(*out)

    return decode


def _dec_pydantic(tp: type[Any]) -> _Convert:
    def decode(data: Any) -> Any:
        try:
            return tp.model_validate(data)
        except ValueError as exc:  # pydantic.ValidationError
            errors = getattr(exc, "errors", None)
            if callable(errors):
                detail = "; ".join(
                    f"{'.'.join(map(str, e.get('loc', ()))) or '(root)'}: {e.get('msg', '')}"
                    for e in errors()[:5]
                )
            else:  # pragma: no cover - a validator raised a plain ValueError
                detail = str(exc)
            raise _Fail(f"does not validate as {_type_repr(tp)}: {detail}") from None

    return decode


_SCALAR_DECODERS: dict[object, _Convert] = {
    bool: _dec_bool,
    int: _dec_int,
    float: _dec_float,
    str: _dec_str,
    _NoneType: _dec_none,
    None: _dec_none,
}
#: Field annotations whose JSON value is already the Python value when its class matches exactly.
_EXACT: dict[object, type[Any] | None] = {bool: bool, int: int, float: float, str: str}

_LIST_ORIGINS: dict[object, type[Any]] = {
    list: list,
    cabc.Sequence: list,
    cabc.MutableSequence: list,
    cabc.Iterable: list,
    cabc.Collection: list,
    set: set,
    cabc.Set: set,
    cabc.MutableSet: set,
    frozenset: frozenset,
}
_DICT_ORIGINS = frozenset({dict, cabc.Mapping, cabc.MutableMapping})


def _build_decoder(tp: object, key: object) -> _Convert:
    if tp is Any or tp is object or isinstance(tp, typing.TypeVar):
        return _identity
    scalar = _lookup(_SCALAR_DECODERS, tp)
    if scalar is not None:
        return scalar
    if isinstance(tp, typing.NewType):
        return _decoder(tp.__supertype__)
    if isinstance(tp, (str, typing.ForwardRef)):
        raise _Unsupported(f"the annotation {tp!r} is a string; pass the class itself, not its name")
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is not None:
        return _build_generic(tp, origin, args, key)
    if not isinstance(tp, type):
        raise _Unsupported(f"perdure cannot load into {_type_repr(tp)}; {_TODO}")
    return _build_class(tp, key)


def _build_generic(tp: object, origin: object, args: tuple[Any, ...], key: object) -> _Convert:
    if origin is typing.Union or origin is types.UnionType:
        return _dec_union(args, tp)
    if origin is typing.Literal:
        return _dec_literal(args, tp)
    if origin is typing.Annotated or origin is typing.ClassVar or origin is typing.Final:
        return _decoder(args[0])
    if origin in _LIST_ORIGINS:
        return _dec_list(args[0] if args else Any, _LIST_ORIGINS[origin], tp)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return _dec_list(args[0], tuple, tp)
        return _dec_fixed_tuple(args, tp)
    if origin in _DICT_ORIGINS:
        key_tp, value_tp = args if args else (Any, Any)
        return _dec_dict(key_tp, value_tp, tp)
    if isinstance(origin, type) and dataclasses.is_dataclass(origin):
        return _dec_dataclass(origin, args, key)
    raise _Unsupported(f"perdure cannot load into {_type_repr(tp)}; {_TODO}")


def _build_class(tp: type[Any], key: object) -> _Convert:
    if issubclass(tp, enum.Enum):
        return _dec_enum(tp)
    for base in (bool, int, float, str):
        if issubclass(tp, base):
            return _dec_scalar_subclass(tp, base)
    if issubclass(tp, (dt.date, dt.time)):  # datetime included
        return _from_string(tp, tp.fromisoformat)
    if issubclass(tp, dt.timedelta):
        return _dec_timedelta(tp)
    if issubclass(tp, uuid.UUID):
        return _from_string(tp, tp)
    if issubclass(tp, decimal.Decimal):
        return _dec_decimal(tp)
    if issubclass(tp, (bytes, bytearray)):
        return _dec_bytes(tp)
    if dataclasses.is_dataclass(tp):
        return _dec_dataclass(tp, (), key)
    model = _pydantic_model_class()
    if model is not None and issubclass(tp, model):
        return _dec_pydantic(tp)
    if typing.is_typeddict(tp):
        return _dec_typeddict(tp)
    if issubclass(tp, tuple) and hasattr(tp, "_fields"):
        return _dec_namedtuple(tp)
    if tp is tuple:
        return _dec_list(Any, tuple, tp)
    if tp in _LIST_ORIGINS:
        return _dec_list(Any, _LIST_ORIGINS[tp], tp)
    if tp in _DICT_ORIGINS:
        return _dec_dict(str, Any, tp)
    raise _Unsupported(f"perdure cannot load into {_type_repr(tp)}; {_TODO}")


# --------------------------------------------------------------------------------------------
# Codecs for stored bytes
# --------------------------------------------------------------------------------------------


@runtime_checkable
class Codec(Protocol):
    """A reversible transformation of stored payload bytes: compression, encryption.

    ``name`` is recorded with what a codec wrote, so a reader can tell which codecs to undo;
    keep it stable. ``decode(encode(b)) == b`` must hold for all bytes ``b``.
    """

    @property
    def name(self) -> str:
        """A short stable identifier, e.g. ``"zlib"``; must not contain ``+``."""
        ...

    def encode(self, data: bytes) -> bytes:
        """Transform bytes for storage."""
        ...

    def decode(self, data: bytes) -> bytes:
        """Undo :meth:`encode`; raise :class:`ValueError` on data it did not write."""
        ...


class ZlibCodec:
    """Compress with zlib (``level`` 0-9, or -1 for zlib's default)."""

    __slots__ = ("level",)
    name = "zlib"

    def __init__(self, level: int = 6) -> None:
        if not -1 <= level <= 9:
            raise ValueError(f"zlib level must be between -1 and 9, got {level}")
        self.level = level

    def encode(self, data: bytes) -> bytes:
        """Compress ``data``."""
        return zlib.compress(data, self.level)

    def decode(self, data: bytes) -> bytes:
        """Decompress ``data``; raise :class:`ValueError` if it is not zlib data."""
        try:
            return zlib.decompress(data)
        except zlib.error as exc:
            raise ValueError(f"zlib codec: the stored payload is not zlib data ({exc})") from None

    def __repr__(self) -> str:
        return f"ZlibCodec(level={self.level})"


class CodecChain:
    """Several codecs as one: ``encode`` applies them in order, ``decode`` in reverse order.

    ``CodecChain(ZlibCodec(), encryption)`` compresses then encrypts; its ``name`` is
    ``"zlib+<encryption name>"``. A chain given to a chain contributes its codecs. An empty chain
    changes nothing and is named ``"identity"``.
    """

    __slots__ = ("codecs", "name")

    def __init__(self, *codecs: Codec) -> None:
        flat: list[Codec] = []
        for codec in codecs:
            if isinstance(codec, CodecChain):  # a chain inside a chain is its codecs
                flat.extend(codec.codecs)
            elif not codec.name or "+" in codec.name:
                raise ValueError(f"codec name {codec.name!r} must be non-empty and must not contain '+'")
            else:
                flat.append(codec)
        self.codecs: tuple[Codec, ...] = tuple(flat)
        self.name: str = "+".join(codec.name for codec in flat) or "identity"

    def encode(self, data: bytes) -> bytes:
        """Apply every codec, first to last."""
        for codec in self.codecs:
            data = codec.encode(data)
        return data

    def decode(self, data: bytes) -> bytes:
        """Undo every codec, last to first."""
        for codec in reversed(self.codecs):
            data = codec.decode(data)
        return data

    def __repr__(self) -> str:
        return f"CodecChain({', '.join(map(repr, self.codecs))})"


__all__ = [
    "dumps",
    "loads",
    "SerializationError",
    "Codec",
    "ZlibCodec",
    "CodecChain",
]
