"""Exception bases shared across layers, so that catching them imports none of the layers that raise them."""

from __future__ import annotations


class RunStopped(Exception):
    """A run stopped on purpose (too many bad samples, a NaN/inf loss): its message says it all, so entry points
    print it as one line instead of a traceback."""
