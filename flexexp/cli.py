"""The ``key=DIR`` arguments of the table commands (``flexexp.report``, ``flexexp.probe``)."""

from __future__ import annotations

import sys

__all__ = ["parse_options"]


def parse_options(argv: list[str], defaults: dict[str, str], usage: str) -> dict[str, str] | int:
    """``defaults`` updated from ``key=value`` words, or the exit status to return: 0 after
    printing ``usage`` for ``-h``/``--help``, 2 after naming an unknown argument."""
    opts = dict(defaults)
    for arg in argv:
        if arg in ("-h", "--help"):
            print(usage)
            return 0
        key, sep, value = arg.partition("=")
        if not sep or key not in opts:
            print(f"error: unknown argument {arg!r}; valid: {', '.join(k + '=DIR' for k in opts)}."
                  f"\n\n{usage}", file=sys.stderr)
            return 2
        opts[key] = value
    return opts
