"""Each setting's allowed values, declared once, for the command lines and for the Python API.

A command-line option declares its range as its argparse ``type`` (``--batch-size`` is
``whole(1)``), so a bad value is refused while the command line is parsed, before anything is
read or written, in one line: ``error: --seed: '-1' is not a whole number in [0, 4294967295]``
(``ArgumentParser``, every command's parser). The settings dataclasses (in ``__post_init__``) and
the estimators (at ``fit``, scikit-learn's ``_validate_params`` made small: ``check_params`` over
the class's ``_parameter_ranges``) check the same declarations with ``check``, which raises
``UserError`` (a ``ValueError``, as scikit-learn raises) naming the owner, the value and what is
allowed. Ranges are written as intervals: ``[1, inf)`` includes 1, ``(0, 1]`` excludes 0.
"""

from __future__ import annotations

import argparse
import math
import numbers
import sys
from dataclasses import dataclass
from typing import NoReturn

from extract.errors import UserError

SEED_MAX = 2**32 - 1  # the seeds NumPy's, Keras' and scikit-learn's generators all accept


@dataclass(frozen=True)
class Interval:
    """Whole numbers (``kind=int``) or numbers between ``low`` and ``high`` (None: unbounded);
    ``closed`` says which ends belong to it, as in scikit-learn's ``Interval``."""

    kind: type
    low: float | None
    high: float | None = None
    closed: str = "both"  # both, left, right, neither

    def __contains__(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral if self.kind is int else numbers.Real):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (value == self.low and self.closed in ("right", "neither"))):
            return False
        return self.high is None or value < self.high or (value == self.high and self.closed in ("right", "both"))

    @property
    def noun(self) -> str:
        return "whole number" if self.kind is int else "number"

    def describe(self) -> str:
        return f"a {self.noun} in {self}"

    def __str__(self) -> str:
        left = "[" if self.low is not None and self.closed in ("both", "left") else "("
        right = "]" if self.high is not None and self.closed in ("both", "right") else ")"
        low = "-inf" if self.low is None else f"{self.low:g}" if self.kind is float else str(self.low)
        high = "inf" if self.high is None else f"{self.high:g}" if self.kind is float else str(self.high)
        return f"{left}{low}, {high}{right}"


def whole(low: int, high: int | None = None) -> Interval:
    return Interval(int, low, high)


def number(low: float | None, high: float | None = None, closed: str = "both") -> Interval:
    return Interval(float, low, high, closed)


@dataclass(frozen=True)
class Names:
    """One of ``allowed`` (scikit-learn's ``StrOptions``)."""

    allowed: tuple[str, ...]

    def __contains__(self, value) -> bool:
        return isinstance(value, str) and value in self.allowed

    def describe(self) -> str:
        return "one of " + ", ".join(map(repr, self.allowed))


@dataclass(frozen=True)
class Several:
    """A list of at least ``least`` (and at most ``most``) values, each in ``each`` (an
    ``Interval``, ``Names`` or ``Several``: a grid of (rows, columns) is ``Several(POSITIVE, 2, 2)``)."""

    each: Interval | Names | Several
    least: int = 1
    most: int | None = None

    def __contains__(self, value) -> bool:
        if isinstance(value, (str, bytes)):
            return False
        try:
            values = list(value)
        except TypeError:
            return False
        return self.least <= len(values) <= (self.most if self.most is not None else len(values)) and all(v in self.each for v in values)

    def describe(self) -> str:
        least = {0: "zero", 1: "one"}.get(self.least, str(self.least))
        count = f"{least} values" if self.most == self.least else f"{least} or more values" if self.most is None else f"{least} to {self.most} values"
        return f"{count}, each {self.each.describe()}"


@dataclass(frozen=True)
class OrNone:
    """None, or a value in ``inner``; on the command line, the option left out."""

    inner: Interval | Names | Several

    def __contains__(self, value) -> bool:
        return value is None or value in self.inner

    def describe(self) -> str:
        return f"{self.inner.describe()} (or None)"


SEEDS = whole(0, SEED_MAX)
POSITIVE = whole(1)
FRACTION = number(0, 1, closed="right")  # (0, 1]: a crop, a share


def check(owner: str, name: str, value, allowed, *, optional: bool = False) -> None:
    """``UserError`` unless ``value`` is in ``allowed`` (an ``Interval``, ``Names``, ``Several`` or
    ``OrNone``; None passes too, when ``optional``)."""
    allowed = OrNone(allowed) if optional else allowed
    if value not in allowed:
        shown = " ".join(repr(value).split())  # one line, even for a NumPy array's wrapped repr
        raise UserError(f"{owner}: {name}={shown} must be {allowed.describe()}")


def check_params(owner: str, values: dict, ranges: dict) -> None:
    """``check`` of every value in ``values`` against its declaration in ``ranges``; a value that
    has none is a bug (``KeyError``): every parameter is declared."""
    for name, value in values.items():
        check(owner, name, value, ranges[name])


def option(interval: Interval | OrNone):
    """The argparse ``type`` of an option whose value lies in ``interval`` (an ``OrNone``'s: its
    interval; None is the option left out)."""
    interval = interval.inner if isinstance(interval, OrNone) else interval

    def parse(text: str):
        try:
            value = interval.kind(text)
        except ValueError:
            value = None
        if value is None or value not in interval:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {interval.noun} in {interval}")
        return value

    parse.__name__ = f"{interval.noun} in {interval}"
    return parse


def names(text: str) -> tuple[str, ...]:
    """The argparse ``type`` of a comma-separated list of names: at least one."""
    found = tuple(item.strip() for item in text.split(",") if item.strip())
    if not found:
        raise argparse.ArgumentTypeError(f"{text!r} names nothing: give one or more comma-separated names")
    return found


def user_option(parse):
    """The argparse ``type`` made of a parser that raises ``UserError`` (its message becomes the line)."""

    def typed(text: str):
        try:
            return parse(text)
        except UserError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    typed.__name__ = parse.__name__
    return typed


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the errors of every other bad value: one line, ``error: --option: ...``, exit 2
    (subcommands' parsers are of the same class)."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message.removeprefix('argument ')}", file=sys.stderr)
        sys.exit(2)
