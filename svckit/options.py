"""Command-line options declared once, each with an environment variable.

A daemon lists its options as a table of :class:`Option` (name, variable,
default, help, parser); ``optParameters`` (and so ``--help``, which names
each variable in brackets) and the environment mapping are made from it, and
:meth:`EnvOptions.parsed` runs every value through its parser into the
keyword arguments of the daemon's typed settings.  A variable that is set
replaces the default, and the command line still wins because it is parsed
afterwards.
"""

from __future__ import annotations

import os
from typing import Any, Callable, ClassVar, Dict, List, Mapping, Optional, Sequence

import attrs
from twisted.python import usage

from svckit.accesslog import FORMATS


@attrs.frozen
class Option:
    """One option, declared once."""

    name: str
    """The long option, without ``--``; the settings attribute is it with ``_`` for ``-``."""
    variable: str
    """The environment variable that sets it."""
    default: Optional[str]
    """As it would be typed (None: not given)."""
    help: str
    parse: Callable[[str], Any] = str
    """Text to value; a ``ValueError`` or ``UsageError`` refuses it (the message follows the option's name)."""

    @property
    def attribute(self) -> str:
        """Its name in the typed settings."""
        return self.name.replace("-", "_")


class EnvOptions(usage.Options):
    """``usage.Options`` made from a table of :class:`Option`, whose defaults come from the environment."""

    table: ClassVar[Sequence[Option]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.optParameters = [[o.name, None, o.default, f"{o.help} [{o.variable}]."] for o in cls.table]  # type: ignore[attr-defined]

    def __init__(self, environ: Optional[Mapping[str, str]] = None) -> None:
        super().__init__()
        env = os.environ if environ is None else environ
        for option in self.table:
            value = env.get(option.variable)
            if value is not None and value != "":
                self[option.name] = value

    def parsed(self) -> Dict[str, Any]:
        """Every option through its parser, by settings attribute (an option not given stays None)."""
        values: Dict[str, Any] = {}
        for option in self.table:
            text = self[option.name]
            try:
                values[option.attribute] = None if text is None else option.parse(text)
            except ValueError as e:
                raise usage.UsageError(f"--{option.name} {e}") from None
        return values

    def argv(self) -> List[str]:
        """These options as a command line (given ones only)."""
        return [f"--{o.name}={self[o.name]}" for o in self.table if self[o.name] is not None]


def endpoint_description(value: str) -> str:
    """A Twisted server endpoint string; a bare port number means ``tcp:N``."""
    value = value.strip()
    if value.isdigit():
        return f"tcp:{value}"
    if not value:
        raise usage.UsageError("an endpoint must not be empty")
    return value


def access_log_destination(value: str) -> str:
    """``-`` (the daemon's log), ``off``, or a file path that must not be empty."""
    value = value.strip()
    if not value:
        raise usage.UsageError("--access-log must be -, off or a file path")
    return value


def access_log_format(value: str) -> str:
    """``combined`` or ``json``."""
    value = value.strip().lower()
    if value not in FORMATS:
        raise usage.UsageError(f"--access-log-format must be {' or '.join(FORMATS)}, not {value!r}")
    return value


def positive(value: str) -> float:
    """A finite number greater than 0."""
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"must be a number, not {value!r}") from None
    if not 0 < number < float("inf"):
        raise ValueError("must be a finite number greater than 0")
    return number


def whole(low: int, high: int) -> Callable[[str], int]:
    """A parser of whole numbers from ``low`` to ``high``."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise ValueError(f"must be a whole number, not {value!r}") from None
        if not low <= number <= high:
            raise ValueError(f"must be {low} ... {high}")
        return number

    return parse


def not_empty(value: str) -> str:
    """Any text but the empty one."""
    if not value:
        raise ValueError("must not be empty")
    return value
