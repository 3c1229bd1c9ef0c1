"""Typed JSON for row values kept for later (templates, the ``check`` query's parameters).

Dates, datetimes, times, decimals and bytes survive the round trip with their types, so a template
formats ``runs_out_on`` as a date and a ``check`` query binds it as one.
"""

from __future__ import annotations

import base64
import json
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return {"$datetime": value.isoformat()}
    if isinstance(value, date):
        return {"$date": value.isoformat()}
    if isinstance(value, time):
        return {"$time": value.isoformat()}
    if isinstance(value, Decimal):
        return {"$decimal": str(value)}
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$bytes": base64.b64encode(bytes(value)).decode()}
    if hasattr(value, "hex") and type(value).__name__ == "UUID":
        return str(value)
    raise TypeError(f"a value of type {type(value).__name__} cannot be kept")


_DECODERS = {
    "$datetime": datetime.fromisoformat,
    "$date": date.fromisoformat,
    "$time": time.fromisoformat,
    "$decimal": Decimal,
    "$bytes": base64.b64decode,
}


def _hook(obj: dict[str, Any]) -> Any:
    if len(obj) == 1:
        ((key, value),) = obj.items()
        decoder = _DECODERS.get(key)
        if decoder is not None:
            return decoder(value)
    return obj


_encoder = json.JSONEncoder(default=_default, ensure_ascii=False, separators=(",", ":"))
_decoder = json.JSONDecoder(object_hook=_hook)


def dumps(values: dict[str, Any]) -> str:
    """Encode a row's values as typed JSON."""
    return _encoder.encode(values)


def loads(text: str) -> dict[str, Any]:
    """Decode typed JSON back into a row's values, types restored."""
    result = _decoder.decode(text)
    assert isinstance(result, dict)
    return result
