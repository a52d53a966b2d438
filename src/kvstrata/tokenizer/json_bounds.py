"""Bounds that make every constrained JSON output end: numbers of bounded length.

A grammar that allows `{"type": "number"}` lets a model write `1111...` or `0.3333...` until
`max_tokens`, and a small model does (SmolLM2 ran an integer on for 200 tokens under a strict
schema). Whitespace is already bounded by the compact layout (tools.JSON_OPTIONS). This module bounds
the numbers, in the schema handed to llguidance, never in what the output means:

- an `integer` without `minimum` / `maximum` gets JSON's safe range, +-(2**53 - 1) (at most 16 digits);
- a `number` without them gets +-10**15, and without `multipleOf` a resolution of 10**-6 (at most 6
  digits after the point; llguidance then writes no exponent);
- `{"type": "json_object"}` becomes an object whose values are any JSON value with those number bounds
  (a recursive `$defs` schema), instead of llguidance's unbounded JSON.

An output under the bounded schema still validates against the original one. A schema that sets its
own bounds keeps them.
"""

from __future__ import annotations

from typing import Any, Callable

SAFE_INT = 2**53 - 1  # the largest integer every JSON reader keeps exactly (JavaScript's Number.MAX_SAFE_INTEGER)
NUMBER_LIMIT = 10**15  # |x| < this for a number without bounds: 15 digits before the point
NUMBER_STEP = 1e-6  # resolution of a number without multipleOf: 6 digits after the point

_ONE = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames",
        "unevaluatedProperties", "unevaluatedItems", "additionalItems")
_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_MAPS = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")


def _types(schema: dict) -> set[str]:
    t = schema.get("type")
    if isinstance(t, str):
        return {t}
    if isinstance(t, list):
        return {x for x in t if isinstance(x, str)}
    return set()


def _has_bounds(schema: dict) -> bool:
    return any(k in schema for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "enum", "const"))


def map_subschemas(schema: dict, fn: Callable[[Any], Any], maps: tuple = _MAPS, lists: tuple = _LISTS,
                   one: tuple = _ONE) -> dict:
    """A shallow copy of `schema` with `fn` applied to each direct subschema under the keywords named
    (maps: name -> schema; lists: [schema]; one: a schema). The one walk every schema rewrite here uses."""
    out = dict(schema)
    for k in maps:
        if isinstance(out.get(k), dict):
            out[k] = {name: fn(s) for name, s in out[k].items()}
    for k in lists:
        if isinstance(out.get(k), list):
            out[k] = [fn(s) for s in out[k]]
    for k in one:
        if isinstance(out.get(k), dict):
            out[k] = fn(out[k])
    return out


def bound_numbers(schema: Any) -> Any:
    """A copy of `schema` in which every integer and number subschema has the bounds above (where it
    has none of its own)."""
    if isinstance(schema, list):
        return [bound_numbers(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = map_subschemas(schema, bound_numbers)
    types = _types(out)
    if types & {"integer", "number"} and not _has_bounds(out):
        if "number" in types:  # (a type list with both: the number's bounds cover the integer)
            out["minimum"], out["maximum"] = -NUMBER_LIMIT, NUMBER_LIMIT
        else:
            out["minimum"], out["maximum"] = -SAFE_INT, SAFE_INT
    if "number" in types and "multipleOf" not in out and not {"enum", "const"} & out.keys():
        out["multipleOf"] = NUMBER_STEP
    return out


def bounded_json_object() -> dict:
    """The schema of `{"type": "json_object"}`: any JSON object, its numbers bounded."""
    value = {"$ref": "#/$defs/value"}
    return {
        "type": "object",
        "additionalProperties": value,
        "$defs": {"value": {"anyOf": [
            {"type": "string"},
            {"type": "number", "minimum": -NUMBER_LIMIT, "maximum": NUMBER_LIMIT, "multipleOf": NUMBER_STEP},
            {"type": "boolean"},
            {"type": "null"},
            {"type": "array", "items": value},
            {"type": "object", "additionalProperties": value},
        ]}},
    }
