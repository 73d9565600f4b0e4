"""Errors a user can cause. The CLI prints them as one line and exits with code 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UsageError(Exception):
    """Bad input: a flag, a plugin name, a config value, a missing file or weights."""


def unknown_name_error(kind: str, name: str, valid: Iterable[str]) -> UsageError:
    """An error for an unknown `name` of `kind` that lists the valid names and suggests the closest."""
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return UsageError(f"unknown {kind} '{name}'.{hint} Valid: {', '.join(valid) or '(none)'}")
