"""Name → builder registries: key = YAML file name = command-line value."""
from __future__ import annotations

import math
from typing import Callable, Iterator


class ConfigError(ValueError):
    """A user-facing configuration problem: one line naming the key and the fix."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.message, self.key = message, key

    def __str__(self) -> str:
        return f"{self.key}: {self.message}" if self.key else self.message

    def within(self, group: str) -> "ConfigError":
        """The same error with its key placed under a config group (`weight` → `reg.weight`), in the fix
        too where the fix names it (`add weight=...` → `add reg.weight=...`)."""
        if not self.key:
            return type(self)(self.message, group)
        return type(self)(self.message.replace(f" {self.key}=", f" {group}.{self.key}="), f"{group}.{self.key}")


class Registry:
    """Strict registry: a duplicate name raises, an unknown name lists the choices."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Callable] = {}

    def register(self, name: str | Callable | None = None):
        """Decorator: `@R.register` keys by the function name, `@R.register("name")` by `name`."""
        if callable(name):
            return self.register(None)(name)

        def add(fn: Callable) -> Callable:
            key = name or fn.__name__
            if key in self._entries:
                raise ValueError(f"duplicate {self.kind} '{key}' in registry")
            self._entries[key] = fn
            return fn

        return add

    def get(self, name: str) -> Callable:
        if not isinstance(name, str) or name not in self._entries:  # a list, say: model.encoder_activation=[relu]
            raise ConfigError(f"unknown {self.kind} '{name}'; choose from: {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def number(value, key: str, *, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False, integer: bool = False) -> float | int:
    """Validate a numeric hyperparameter; the error names `key` and the allowed range."""
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool):
        raise ConfigError(f"must be {kind}, got {value!r}", key)
    if not isinstance(value, (int, float)):
        try:
            value = int(value) if integer else float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"must be {kind}, got {value!r}", key) from None
    if not math.isfinite(value):
        raise ConfigError(f"must be a finite number, got {value!r}", key)
    if integer and float(value) != int(value):
        raise ConfigError(f"must be {kind}, got {value!r}", key)
    value = int(value) if integer else float(value)
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
        hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
        span = f"in {lo}, {hi}" if low is not None and high is not None else (
            f"{'>' if low_open else '>='} {low:g}" if low is not None else f"{'<' if high_open else '<='} {high:g}")
        raise ConfigError(f"must be {span}, got {value:g}", key)
    return value


def choice(value, key: str, choices: tuple[str, ...]) -> str:
    """One of `choices`; YAML's bare on/off arrive as booleans and mean "on"/"off"."""
    value = {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value
    if value not in choices:
        raise ConfigError(f"must be one of {', '.join(choices)}, got {value!r}", key)
    return value


def flag(value, key: str) -> bool:
    """A boolean setting; 1, "yes" and the like are refused rather than guessed."""
    if not isinstance(value, bool):
        raise ConfigError(f"must be true or false, got {value!r}", key)
    return value
