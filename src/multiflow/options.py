"""Options defined once: a config field carries its help text and choices as metadata (`option`); the CLI adds
its arguments from the fields (`add_arguments`) and the config checks its values against the same choices
(`check_choices`). Help and choices may be callables, read when the parser is built (the registries)."""

from __future__ import annotations

import argparse
from dataclasses import MISSING, Field, field, fields
from typing import Any, Callable, Iterable

from multiflow.errors import MultiflowError


def option(default: Any = MISSING, *, help: str | Callable[[], str], choices: Any = None,
           default_factory: Any = MISSING, cli_default: Any = None, parse: Callable[[str], Any] | None = None,
           metavar: str | None = None) -> Any:
    """A dataclass field with its CLI help and choices. `cli_default`: the default as the command line spells it
    (e.g. "unstructured" for a Structure), when it differs from the field's. `parse`: the command line's text to
    the field's value (argparse's `type`; its errors are usage errors); `metavar`: the value's name in --help."""
    return field(default=default, default_factory=default_factory,
                 metadata={"help": help, "choices": choices, "cli_default": cli_default, "parse": parse,
                           "metavar": metavar})


def flag(f: Field) -> str:
    return "--" + f.name.replace("_", "-")


def _resolve(value: Any) -> Any:
    return value() if callable(value) else value


def choices_of(f: Field) -> list[str] | None:
    found = _resolve(f.metadata.get("choices"))
    return None if found is None else list(found)


def add_arguments(parser: argparse.ArgumentParser, config: type, names: Iterable[str]) -> None:
    """One argument per named field of the `config` dataclass, in the given order: --name-with-dashes, its
    default, help text and choices from the field."""
    by_name = {f.name: f for f in fields(config)}
    for name in names:
        f = by_name[name]
        default = f.metadata["cli_default"] if f.metadata.get("cli_default") is not None else f.default
        extra = {"choices": choices_of(f)} if choices_of(f) is not None else {}
        extra.update({k: f.metadata[m] for k, m in (("type", "parse"), ("metavar", "metavar")) if f.metadata.get(m)})
        parser.add_argument(flag(f), default=default, help=_resolve(f.metadata["help"]), **extra)


def check_choices(config: Any) -> None:
    """Every field with choices holds one of them; else an error naming the flag and the choices."""
    for f in fields(config):
        allowed = choices_of(f)
        if allowed is not None and getattr(config, f.name) not in allowed:
            raise MultiflowError(f"{flag(f)} {getattr(config, f.name)!r}: choose one of {', '.join(allowed)}")
