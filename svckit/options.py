"""Command-line options declared once, each with an environment variable.

A daemon lists its options as a table of :class:`Option` (name, variable,
default, help, parser); ``optParameters`` (and so ``--help``, which names
each variable in brackets) and the environment mapping are made from it, and
:meth:`EnvOptions.parsed` runs every value through its parser into the
keyword arguments of the daemon's typed settings.  A variable that is set
replaces the default, and the command line still wins because it is parsed
afterwards.

**Secrets from files.**  An option declared ``secret`` (a password, a URL
that may hold one) can also be given as a file, the way Docker and Kubernetes
hand secrets over: ``--NAME-file PATH`` or the variable ``VARIABLE_FILE``
(the ``_FILE`` convention of the official postgres and rabbitmq images).
The value is the file's content with its trailing newlines dropped; a file
that cannot be read stops the daemon with one line.  The command line wins
over the environment; giving both forms at one level is refused rather than
one silently ignored.  :meth:`EnvOptions.argv` (the command line of worker
processes, which inherit the environment) repeats only what was typed, and a
secret read from a file as ``--NAME-file``, so ``ps`` shows no more than the
operator typed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, List, Mapping, Optional, Sequence, Set

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
    secret: bool = False
    """Also takes ``--NAME-file`` and ``VARIABLE_FILE``; the value must never be logged."""

    @property
    def attribute(self) -> str:
        """Its name in the typed settings."""
        return self.name.replace("-", "_")

    @property
    def file_name(self) -> str:
        """The option that names a file holding this (secret) one."""
        return f"{self.name}-file"


def read_secret(path: str) -> str:
    """A secret file's content, trailing newlines dropped; ``ValueError`` saying why it cannot be read."""
    try:
        return Path(path).read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ValueError(f"{path}: cannot be read ({reason})") from None


class EnvOptions(usage.Options):
    """``usage.Options`` made from a table of :class:`Option`, whose defaults come from the environment."""

    table: ClassVar[Sequence[Option]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        parameters = []
        for o in cls.table:
            parameters.append([o.name, None, o.default, f"{o.help} [{o.variable}]."])
            if o.secret:
                parameters.append([o.file_name, None, None,
                                   f"File holding --{o.name}, trailing newline dropped [{o.variable}_FILE]."])
        cls.optParameters = parameters  # type: ignore[attr-defined]

    def __init__(self, environ: Optional[Mapping[str, str]] = None) -> None:
        super().__init__()
        env = os.environ if environ is None else environ
        from_environment = set()
        for option in self.table:
            names = [(option.name, option.variable)]
            if option.secret:
                names.append((option.file_name, f"{option.variable}_FILE"))
            for name, variable in names:
                value = env.get(variable)
                if value is not None and value != "":
                    self[name] = value
                    from_environment.add(name)
        self._from_environment = from_environment
        """Options whose value is the environment's."""
        self._typed_names: Set[str] = set()
        """Options given on the command line."""
        self._secrets_read = False

    def __setitem__(self, key: str, value: Any) -> None:
        """A value set once ``__init__`` is done came from the command line."""
        typed = getattr(self, "_typed_names", None)
        if typed is not None:
            typed.add(key)
        super().__setitem__(key, value)

    def _typed(self, name: str) -> bool:
        return name in self._typed_names

    def read_secrets(self) -> None:
        """Replace each secret given as a file by the file's content (once; before any check of values)."""
        if self._secrets_read:
            return
        self._secrets_read = True
        for option in self.table:
            if not option.secret:
                continue
            path = self[option.file_name]
            if path is None:
                continue
            file_typed, value_typed = self._typed(option.file_name), self._typed(option.name)
            if file_typed and value_typed:
                raise usage.UsageError(f"give --{option.name} or --{option.file_name}, not both")
            if value_typed:
                continue  # the command line beats the environment's file
            if not file_typed and option.name in self._from_environment:  # both variables set
                raise usage.UsageError(f"set {option.variable} or {option.variable}_FILE, not both")
            try:
                dict.__setitem__(self, option.name, read_secret(path))
            except ValueError as e:
                raise usage.UsageError(f"--{option.file_name} {e}") from None

    def parsed(self) -> Dict[str, Any]:
        """Every option through its parser, by settings attribute (an option not given stays None)."""
        self.read_secrets()
        values: Dict[str, Any] = {}
        for option in self.table:
            text = self[option.name]
            try:
                values[option.attribute] = None if text is None else option.parse(text)
            except ValueError as e:
                message = str(e)
                if option.secret:  # never echo a secret, whatever the parser's message quotes
                    message = message.replace(repr(text), "(the value given)").replace(text, "(the value given)")
                raise usage.UsageError(f"--{option.name} {message}") from None
        return values

    def argv(self) -> List[str]:
        """What was typed, as a command line, for worker processes that inherit the environment (so an option
        set there is not repeated where ``ps`` shows it); a secret typed as a file stays a file."""
        arguments = []
        for o in self.table:
            if o.secret and self._typed(o.file_name) and not self._typed(o.name):
                arguments.append(f"--{o.file_name}={self[o.file_name]}")
            elif self._typed(o.name):
                arguments.append(f"--{o.name}={self[o.name]}")
        return arguments


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
