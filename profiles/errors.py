"""The profiler's error root: settings that cannot make a profile."""

from __future__ import annotations

from diffsplit.transport.errors import DiffsplitError


class ProfileError(DiffsplitError):
    """A profile cannot be made with the given settings (the message says which and why)."""
