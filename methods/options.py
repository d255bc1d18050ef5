"""Method options: declared default, type and meaning; values from the CLI arrive as strings."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import MethodError


@dataclass(frozen=True)
class Option:
    """One method option: its default, type and meaning. Values from the CLI arrive as strings."""

    default: Any
    type: type
    help: str
    choices: tuple | None = None

    def coerce(self, name: str, value: Any) -> Any:
        try:
            value = _coerce(self.type, value)
        except (TypeError, ValueError):
            raise MethodError(
                f"option {name}={value!r} is not a {self.type.__name__}" + self._choices_hint()
            ) from None
        if self.choices is not None and value not in self.choices:
            raise MethodError(f"option {name}={value!r} is not valid" + self._choices_hint())
        return value

    def _choices_hint(self) -> str:
        if self.type is bool and not self.choices:  # say what the CLI accepts for a flag
            return "; valid: true, false"
        if self.choices:
            return f"; valid: {', '.join(map(str, self.choices))}"
        return f"; valid: {_VALID.get(self.type, 'a ' + self.type.__name__)}"


_VALID = {int: "an integer", float: "a number", str: "a text value", tuple: "a comma-separated list of integers"}


def _coerce(kind: type, value: Any) -> Any:
    if value is None:
        return None
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ValueError(value)
    if kind in (int, float):
        if isinstance(value, bool):
            raise TypeError(value)
        number = kind(value)
        if kind is int and isinstance(value, float) and value != number:
            raise ValueError(value)
        return number
    if kind is tuple:  # a list of ints, e.g. per-layer ToMe r: "8,8,4" or (8, 8, 4)
        if isinstance(value, str):
            value = [v for v in value.replace(";", ",").split(",") if v.strip()]
        return tuple(int(v) for v in value)
    return kind(value)


def validate_options(declared: dict[str, Option], options: dict, method_name: str) -> dict:
    """Fill defaults, reject unknown names, coerce types. Returns a plain dict in declared order."""
    unknown = sorted(set(options) - set(declared))
    if unknown:
        valid = ", ".join(declared) or "(none)"
        raise MethodError(f"unknown option {unknown[0]!r} for method {method_name}; valid: {valid}")
    return {k: opt.coerce(k, options.get(k, opt.default)) for k, opt in declared.items()}
