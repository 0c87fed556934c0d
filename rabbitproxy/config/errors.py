"""pydantic's validation errors in our words: one ``"key.path: reason"`` line each, naming the key as the file does.

pydantic words its errors for programmers ("Input should be a valid integer", locations with union members such as
``constrained-int``). An operator reads a TOML file, so every error type our models can raise gets a sentence
here, and a location is rendered as the path to the key in the file, with service and backend names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails


def loc_path(config: Mapping[str, Any], loc: Iterable[int | str]) -> str:
    """Render a location with service and backend names instead of list indexes, where a name is unambiguous."""
    parts: list[str] = []
    node: Any = config
    for item in loc:
        if isinstance(item, int):
            name = None
            if isinstance(node, list) and 0 <= item < len(node) and isinstance(node[item], Mapping):
                name = node[item].get("name")
                names = [e.get("name") for e in node if isinstance(e, Mapping)]
                if names.count(name) > 1 or not (isinstance(name, str) and 0 < len(name) <= 128):
                    # Two entries with one name, or a name that is itself wrong: only the index is clear.
                    name = None
            parts[-1] += f"[{name!r}]" if isinstance(name, str) else f"[{item}]"
            node = node[item] if isinstance(node, list) and 0 <= item < len(node) else None
        else:
            parts.append(item)
            node = node.get(item) if isinstance(node, Mapping) else None
    return ".".join(parts) or "(top level)"


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _not(err: ErrorDetails) -> str:
    value = err["input"]
    if isinstance(value, str):
        # A quoted number or boolean is the usual slip: say how to write it.
        bare = value.strip().lower() in ("true", "false") or value.strip().replace(".", "", 1).isdigit()
        return f", not the string {_shown(value)}" + (" (write it without quotes)" if bare else "")
    if isinstance(value, dict):
        return ", not a table"
    return f", not {_shown(value)}"


def _too_short(err: ErrorDetails) -> str:
    least = err.get("ctx", {}).get("min_length")
    if isinstance(err["input"], str):
        return "must not be empty" if least == 1 else f"needs at least {least} characters"
    return f"needs at least {least} entr{'y' if least == 1 else 'ies'}"


def _too_long(err: ErrorDetails) -> str:
    unit = "characters" if isinstance(err["input"], str) else "entries"
    return f"may have at most {err.get('ctx', {}).get('max_length')} {unit}, not {len(err['input'])}"


# One sentence per error type our models can raise. A type missing here falls back to pydantic's words, which
# tests/unit/test_config_files.py would catch for every file of its table.
_MESSAGES: dict[str, Callable[[ErrorDetails], str]] = {
    "missing": lambda e: "required, but missing",
    "extra_forbidden": lambda e: "unknown key",
    "int_type": lambda e: "must be a whole number" + _not(e),
    "int_parsing": lambda e: "must be a whole number" + _not(e),
    "int_from_float": lambda e: "must be a whole number" + _not(e),
    "float_type": lambda e: "must be a number" + _not(e),
    "float_parsing": lambda e: "must be a number" + _not(e),
    "bool_type": lambda e: "must be true or false" + _not(e),
    "bool_parsing": lambda e: "must be true or false" + _not(e),
    "string_type": lambda e: f"must be a string (in quotes), not {_shown(e['input'])}",
    "list_type": lambda e: f"must be a list ([...]), not {_shown(e['input'])}",
    "model_type": lambda e: f"must be a table, not {_shown(e['input'])}",
    "model_attributes_type": lambda e: f"must be a table, not {_shown(e['input'])}",
    "dict_type": lambda e: f"must be a table, not {_shown(e['input'])}",
    "literal_error": lambda e: f"must be one of {e.get('ctx', {}).get('expected')}, not {_shown(e['input'])}",
    "greater_than": lambda e: f"must be more than {e.get('ctx', {}).get('gt')}, not {_shown(e['input'])}",
    "greater_than_equal": lambda e: f"must be at least {e.get('ctx', {}).get('ge')}, not {_shown(e['input'])}",
    "less_than": lambda e: f"must be less than {e.get('ctx', {}).get('lt')}, not {_shown(e['input'])}",
    "less_than_equal": lambda e: f"must be at most {e.get('ctx', {}).get('le')}, not {_shown(e['input'])}",
    "too_short": _too_short,
    "too_long": _too_long,
    "string_too_short": _too_short,
    "string_too_long": _too_long,
    "finite_number": lambda e: f"must be a finite number, not {_shown(e['input'])}",
    "value_error": lambda e: str(e.get("ctx", {}).get("error", e["msg"])),
}


def message(err: ErrorDetails) -> str:
    """The reason of one pydantic error, in our words."""
    render = _MESSAGES.get(err["type"])
    return render(err) if render is not None else err["msg"]


def error_lines(exc: ValidationError, data: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> list[str]:
    """One ``"key.path: reason"`` line per pydantic error; ``prefix`` places a sub-model's errors in the file."""
    return [f"{loc_path(data, (*prefix, *err['loc']))}: {message(err)}" for err in exc.errors()]
