"""Paths as users give them: local paths made absolute, URIs left as they are."""

from __future__ import annotations

import os


def resolve_path(path: str) -> str:
    """A path the user gave, made absolute against their working directory before it goes to
    Ray (whose workers run elsewhere); URIs ("scheme://...") and "" (off) are left as they are."""
    return path if not path or "://" in path else os.path.abspath(os.path.expanduser(path))
