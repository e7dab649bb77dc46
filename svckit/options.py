"""Command-line options that fall back to environment variables.

Each daemon's ``Options`` lists ``optParameters`` as usual and maps option names
to variables in ``envVars``; a variable that is set replaces the default, and the
command line still wins because it is parsed afterwards.
"""

from __future__ import annotations

import os
from typing import Dict, Mapping, Optional

from twisted.python import usage

from svckit.accesslog import FORMATS


class EnvOptions(usage.Options):
    """``usage.Options`` whose defaults come from the environment."""

    envVars: Dict[str, str] = {}

    def __init__(self, environ: Optional[Mapping[str, str]] = None) -> None:
        super().__init__()
        env = os.environ if environ is None else environ
        for option, variable in self.envVars.items():
            value = env.get(variable)
            if value is not None and value != "":
                self[option] = value


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


def positive_float(name: str, value: str) -> float:
    """Parse ``value`` as a number > 0, or raise ``UsageError`` naming ``name``."""
    try:
        number = float(value)
    except ValueError:
        raise usage.UsageError(f"{name} must be a number, not {value!r}") from None
    if not 0 < number < float("inf"):
        raise usage.UsageError(f"{name} must be a finite number greater than 0")
    return number
