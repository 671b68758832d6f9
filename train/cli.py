"""Command lines generated from config dataclasses, and the checks that name a bad flag.

Every program and benchmark declares its settings once, as a frozen dataclass whose docstring's
``Attributes`` section is the help; :func:`parse` turns it into a command line with tyro
(``--learning-rate`` for ``learning_rate``).  The dataclass checks its values in ``__post_init__`` with
the ``check_*`` helpers here, which raise :class:`ConfigError`; :func:`parse` prints that as a usage error
naming the flag, as argparse does.

Lists of numbers or names (:data:`Ints`, :data:`Floats`, :data:`Names`) take comma-separated values
(``--seeds 0,1,2``), space-separated ones (``--seeds 0 1 2``) or both.

Example:
    >>> import dataclasses
    >>> @dataclasses.dataclass(frozen=True)
    ... class Config:
    ...     '''A tiny command line.
    ...
    ...     Attributes:
    ...       seeds: the seeds to run.
    ...     '''
    ...     seeds: Ints = (0,)
    ...
    ...     def __post_init__(self) -> None:
    ...         check_distinct(self.seeds, "seeds", low=0)
    >>> parse(Config, ["--seeds", "1,2", "3"], prog="demo", description="A demo.").seeds
    (1, 2, 3)
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Collection, Sequence
from typing import Annotated, Any, TypeVar

import tyro
from tyro.constructors import PrimitiveConstructorSpec

Config = TypeVar("Config")


class ConfigError(Exception):
    """A setting out of its range; :func:`parse` reports it as a usage error naming the flag.

    Not a ``ValueError``: tyro reports those itself, in a box that wraps long messages, and the programs
    print theirs as argparse does (``usage: ...`` then ``error: ...``, exit status 2).
    """


def parse(
    config_class: type[Config],
    argv: Sequence[str] | None,
    *,
    prog: str,
    description: str,
    default: Config | None = None,
    **tyro_options: Any,
) -> Config:
    """The command line ``argv`` (``None``: ``sys.argv[1:]``) as a ``config_class``, whose fields' defaults
    are those of ``default`` when it is given (e.g. a task's preset); ``tyro_options`` go to ``tyro.cli``.

    Raises:
      SystemExit: with status 2 and a message naming the flag, for a value out of its range (or tyro's own
        message for an unknown flag or a value of the wrong type).
    """
    try:
        return tyro.cli(config_class, args=argv, prog=prog, description=description, default=default, **tyro_options)
    except ConfigError as e:
        print(f"usage: {prog} [-h] [OPTIONS]\n{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from e


def _comma_list(kind: Callable[[str], Any], metavar: str) -> PrimitiveConstructorSpec:
    def from_strings(items: list[str]) -> tuple:
        return tuple(kind(part.strip()) for item in items for part in item.split(",") if part.strip())

    return PrimitiveConstructorSpec(
        nargs="*",
        metavar=metavar,
        instance_from_str=from_strings,
        is_instance=lambda value: isinstance(value, tuple),
        str_from_instance=lambda value: [",".join(map(str, value))],
    )


Ints = Annotated[tuple[int, ...], _comma_list(int, "INT,...")]
Floats = Annotated[tuple[float, ...], _comma_list(float, "FLOAT,...")]
Names = Annotated[tuple[str, ...], _comma_list(str, "NAME,...")]


def flag(field: str) -> str:
    """The command-line flag of a config field: ``--learning-rate`` for ``learning_rate``."""
    return "--" + field.replace("_", "-")


def check_count(value: Any, field: str, *, low: int = 1, optional: bool = False) -> None:
    """``value`` is an int >= ``low`` (``None`` too, when ``optional``)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        kind = "a positive int" if low == 1 else f"an int >= {low}"
        raise ConfigError(f"{flag(field)} must be {kind}, got {value!r}")


def check_number(value: Any, field: str, *, low: float | None = None, below: float | None = None) -> None:
    """``value`` is a finite number in ``[low, below)`` (either bound may be absent)."""
    ok = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    if ok and low is not None:
        ok = value >= low
    if ok and below is not None:
        ok = value < below
    if not ok:
        bounds = "" if low is None else f" in [{low:g}, {below:g})" if below is not None else f" >= {low:g}"
        raise ConfigError(f"{flag(field)} must be a finite number{bounds}, got {value!r}")


def check_rate(value: Any, field: str, *, optional: bool = False) -> None:
    """``value`` is a finite number > 0 (``None`` too, when ``optional``): a learning rate, a scale."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{flag(field)} must be a finite number > 0, got {value!r}")


def check_distinct(values: tuple, field: str, *, low: float, strict: bool = False) -> None:
    """``values`` is a non-empty tuple of distinct finite numbers >= ``low`` (> ``low`` when ``strict``)."""
    kind = "ints" if all(isinstance(v, int) for v in values) else "numbers"
    valid = all(math.isfinite(v) and (v > low if strict else v >= low) for v in values)
    if not values or not valid or len(set(values)) != len(values):
        bound = f"> {low:g}" if strict else f">= {low:g}"
        raise ConfigError(f"{flag(field)} must be distinct {kind} {bound}, got {','.join(map(str, values))!r}")


def check_names(values: tuple[str, ...], field: str, choices: Collection[str]) -> None:
    """``values`` is a non-empty tuple of distinct names out of ``choices``."""
    if not values or set(values) - set(choices) or len(set(values)) != len(values):
        raise ConfigError(f"{flag(field)} must be distinct names out of {','.join(choices)}, got {','.join(values)!r}")
