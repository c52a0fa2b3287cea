"""The one base class of the errors a user can act on.

An :class:`AeforgeError`'s message is the whole story: it names the field, file, setting or endpoint that is
wrong and what to do. The CLI prints such an error as one clean line (exit code 2); any other exception is a bug
in aeforge and is printed with its traceback and a line saying so. Every layer (services, jobs, workers) raises
subclasses of this class, so it lives at the bottom of the dependency graph.
"""

from __future__ import annotations


class AeforgeError(Exception):
    """An error a user can act on (a bad spec, data file, setting, storage endpoint, unknown model or job)."""
