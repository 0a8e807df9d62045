"""Cron strings for schedules: standard 5-field cron in, each target's dialect out.

* KFP recurring runs take 6 fields with seconds first (``0 0 2 * * *``), and no time zone:
  they fire in the scheduler's time zone (UTC on a standard install).
* Vertex AI schedules take standard 5-field cron, optionally prefixed ``TZ=Area/City``.

``parse_cron`` accepts standard 5-field cron, an optional ``TZ=``/``CRON_TZ=`` prefix and the
``@daily``-style shorthands, and checks every field strictly, so a typo fails here with a
message that names the field, not hours later on the server. Names (``MON``, ``jan``) become
numbers, which both dialects read the same way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

EXAMPLE = "0 2 * * *"
_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_DAYS = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")
# (name, lowest, highest, names for lowest.. in order)
_FIELDS = (
    ("minute", 0, 59, ()),
    ("hour", 0, 23, ()),
    ("day-of-month", 1, 31, ()),
    ("month", 1, 12, _MONTHS),
    ("day-of-week", 0, 6, _DAYS),
)
_SHORTHANDS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_TZ_PREFIX = re.compile(r"(?:CRON_TZ|TZ)=(\S*)\s+(.*)", re.DOTALL)
_ITEM = re.compile(r"(?P<base>\*|[A-Za-z0-9]+(?:-[A-Za-z0-9]+)?)(?:/(?P<step>[0-9]+))?")


class CronError(ValueError):
    """A cron string that is not valid standard 5-field cron; the message is one line."""


@dataclass(frozen=True)
class Cron:
    """A validated schedule.

    Attributes:
        fields: The five fields (minute, hour, day of month, month, day of week), names
            turned into numbers.
        timezone: An IANA time zone name, or None for the target's default.
    """

    fields: tuple[str, str, str, str, str]
    timezone: str | None = None

    def standard(self) -> str:
        """The five fields, space-separated."""
        return " ".join(self.fields)

    def for_kfp(self) -> str:
        """KFP's 6-field form, seconds first.

        Raises:
            CronError: The schedule has a time zone, which KFP recurring runs cannot take.
        """
        if self.timezone:
            raise CronError(
                f"KFP recurring runs take no time zone (they fire in the scheduler's, UTC on a "
                f"standard install): drop TZ={self.timezone} and give the time in UTC"
            )
        return "0 " + self.standard()

    def for_vertex(self) -> str:
        """Vertex AI's form: standard 5-field cron with an optional ``TZ=`` prefix."""
        return (f"TZ={self.timezone} " if self.timezone else "") + self.standard()


def parse_cron(text: str) -> Cron:
    """Validate a standard cron string.

    Args:
        text: ``[TZ=Area/City ]M H DoM Mon DoW`` or a shorthand such as ``@daily``.

    Returns:
        The schedule, normalised.

    Raises:
        CronError: What is wrong, in one line that quotes the input.
    """

    def fail(why: str, *, shape: bool = False) -> CronError:
        hint = (
            (
                f" (expected 5 fields: minute hour day-of-month month day-of-week, e.g. {EXAMPLE!r} "
                "for 02:00 daily)"
            )
            if shape
            else ""
        )
        return CronError(f"bad cron {text!r}: {why}{hint}")

    rest = " ".join(text.split())
    timezone = None
    prefixed = _TZ_PREFIX.fullmatch(rest)
    if prefixed:
        timezone, rest = prefixed.groups()
        _check_timezone(timezone, fail)
    rest = _SHORTHANDS.get(rest.lower(), rest) if rest.startswith("@") else rest
    if rest.startswith("@"):
        raise fail(f"unknown shorthand {rest.split()[0]!r} (known: {', '.join(_SHORTHANDS)})")
    fields = rest.split()
    if len(fields) == 6:
        raise fail(
            "6 fields given: write standard 5-field cron; the seconds field KFP needs is added for you"
        )
    if len(fields) != 5:
        raise fail(f"{len(fields)} field{'s' if len(fields) != 1 else ''} given", shape=True)
    normalised = tuple(_field(value, spec, fail) for value, spec in zip(fields, _FIELDS, strict=False))
    return Cron(normalised, timezone)  # type: ignore[arg-type]


def _check_timezone(name: str, fail) -> None:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    if not name:
        raise fail("TZ= names no time zone")
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise fail(f"unknown time zone {name!r} (use an IANA name such as 'Europe/Paris' or 'UTC')") from None


def _field(value: str, spec: tuple, fail) -> str:
    """One field, checked item by item; names become numbers."""
    name, low, high, _ = spec
    out = []
    for item in value.split(","):
        match = _ITEM.fullmatch(item)
        if not match:
            raise fail(
                f"{name} field {value!r} is not cron syntax (use *, N, N-M, */S, N-M/S or lists of them)"
            )
        base, step = match["base"], match["step"]
        if base == "*":
            first, last, text = low, high, "*"
        else:
            bounds = [_number(part, spec, fail) for part in base.split("-")]
            first, last = bounds[0], bounds[-1]
            if first > last:
                raise fail(f"{name} range {base!r} runs backwards")
            text = "-".join(str(b) for b in bounds)
        if step is not None:
            if int(step) < 1:
                raise fail(f"{name} step in {item!r} must be at least 1")
            if len(base.split("-")) == 1 and base != "*":
                # 'N/S' means 'N-max/S' to some crons and is an error to others: refuse it.
                raise fail(f"{name} item {item!r} steps from a single value; write {base}-{high}/{step}")
            text += f"/{int(step)}"
        out.append(text)
    return ",".join(out)


def _number(part: str, spec: tuple, fail) -> int:
    name, low, high, names = spec
    if part.isdigit():
        number = int(part)
        if name == "day-of-week" and number == 7:
            raise fail("day-of-week 7 is not read the same way everywhere; write 0 or SUN for Sunday")
    elif part.upper() in names:
        number = low + names.index(part.upper())
    else:
        allowed = f" or {names[0]}-{names[-1]}" if names else ""
        raise fail(f"{name} value {part!r} is not a number{allowed}")
    if not low <= number <= high:
        raise fail(f"{name} {number} is out of range {low}-{high}")
    return number
