"""Unknown names: the one "did you mean" rule of kbit.

Every lookup of a user-given name (data type, family, task, dataset, sweep, budget unit, ...)
fails the same way: the field, the value, what is allowed and the closest match, on one line.
Long lists (lm-eval knows ~12,000 task names) are cut to the closest few so the message stays
one readable line instead of hundreds of kilobytes.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

MAX_LISTED = 20  # lists longer than this show only the closest matches and a count


def closest(value: str, known: Iterable[str], n: int = 1, cutoff: float = 0.6) -> list[str]:
    """The ``n`` known names closest to ``value`` (difflib ratio >= ``cutoff``), best first."""
    return difflib.get_close_matches(str(value), [str(k) for k in known], n=n, cutoff=cutoff)


def did_you_mean(value: str, known: Iterable[str], cutoff: float = 0.6) -> str:
    """``"; did you mean 'x'?"`` for the closest known name, or ``""`` when none is close."""
    match = closest(value, known, 1, cutoff)
    return f"; did you mean {match[0]!r}?" if match else ""


def unknown_name(
    field: str, value: object, known: Iterable[str], what: str = "allowed"
) -> ValueError:
    """``field=value is unknown; allowed: [...]; did you mean ...?`` as a ValueError.

    At most :data:`MAX_LISTED` names are listed: beyond that, the closest ones and the count.
    """
    names = sorted({str(k) for k in known})
    hint = did_you_mean(str(value), names)
    if len(names) <= MAX_LISTED:
        listed = str(names)
    else:
        near = closest(str(value), names, n=5, cutoff=0.4)
        listed = f"{len(names)} names" + (f", the closest: {near}" if near else "")
    return ValueError(f"{field}={value!r} is unknown; {what}: {listed}{hint}")
