"""Unknown names: the one "did you mean" rule of kbit.

Every lookup of a user-given name (data type, family, task, dataset, sweep, budget unit, ...)
fails the same way: the field, the value, what is allowed and the closest match, on one line.
Long lists (lm-eval knows ~12,000 task names) are cut to the closest few so the message stays
one readable line instead of hundreds of kilobytes.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

MAX_LISTED = 20  # lists longer than this show only the closest matches and a count
SHORT_LISTED = 5  # names a shortened list shows, the closest first
MAX_LIST_CHARS = 100  # a list written longer than this shows the closest few and a count
PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")  # safe as one folder name


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

    At most :data:`MAX_LISTED` names, written in at most :data:`MAX_LIST_CHARS` characters,
    are listed: beyond that, the closest ones and the count (a refusal stays one short line).
    """
    names = sorted({str(k) for k in known})
    hint = did_you_mean(str(value), names)
    if len(names) <= MAX_LISTED and len(str(names)) <= MAX_LIST_CHARS:
        listed = str(names)
    elif len(names) <= MAX_LISTED:  # a short list of long names: the closest few, a count
        near = closest(str(value), names, n=SHORT_LISTED, cutoff=0.0)
        listed = f"{near} ({len(names) - len(near)} more)"
    else:
        near = closest(str(value), names, n=5, cutoff=0.4)
        listed = f"{len(names)} names" + (f", the closest: {near}" if near else "")
    return ValueError(f"{field}={value!r} is unknown; {what}: {listed}{hint}")


def short_allowed(value: str, known: Iterable[str], where: str, shown: int = SHORT_LISTED) -> str:
    """A few allowed names, the closest to ``value`` first, then ``(N more: see <where>)``.

    Why: a refusal is one line a user reads; listing every key of a schema made lines of
    300+ characters. The closest names come first, so the one meant is usually shown.
    """
    names = list(dict.fromkeys(str(k) for k in known))
    if len(names) <= shown:
        return ", ".join(names)
    near = closest(value, names, n=shown, cutoff=0.0)
    listed = near + [n for n in names if n not in near][: shown - len(near)]
    return f"{', '.join(listed)} ({len(names) - len(listed)} more: see {where})"


def plain_name_problem(field_name: str, value: object) -> str | None:
    """Why ``value`` is not a name that is safe as one folder (None when it is).

    Letters, digits, ``_ . -``, never a path: a sweep, a zoo family and a store folder are named
    by users and become folders; the cell config (harness.config.schema.plain_name), the store
    tools and the zoo apply this one rule.
    """
    text = str(value)
    if PLAIN_NAME.match(text) and ".." not in text:
        return None
    return (
        f"{field_name}={text!r} is not a plain name; allowed: letters, digits, '_', '.', '-' "
        "(starting with a letter or digit, no '..', no '/'), at most 128 characters"
    )
