"""Out-of-memory failures told apart by where they came from, from the text a failure leaves (an exception, Ray's
job message, the log's tail):

- from outside the job: Ray's memory monitor killed one of its processes because the node ran low (other work on
  the node may have taken the memory), or a process was SIGKILLed (exit code -9 / 137: the kernel's OOM killer does
  that). Another attempt may well fit: the queue retries it.
- from inside the job: an allocation the job itself asked for failed (torch's OutOfMemoryError, "can't allocate
  memory", Python's MemoryError). It asks as much every time: not retried, and the message says to ask for less.

A job is refused at submit when its estimate cannot fit the largest node (jobs.limits), so what fails here was
expected to fit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_OUTSIDE = (
    (
        re.compile(
            r"ray\.exceptions\.OutOfMemoryError|Task was killed due to the node running low on memory|"
            r"killed due to memory pressure|due to memory pressure \(OOM\)"
        ),
        "Ray's memory monitor killed a process of the job because its node ran low on memory",
    ),
    (
        re.compile(r"exit code (?:-9|137)\b|exited with code (?:-9|137)\b|\bSIGKILL\b|killed by signal 9"),
        "a process of the job was killed with SIGKILL (exit code -9 / 137), as the kernel's OOM killer does",
    ),
)
_INSIDE = re.compile(
    r"torch\.(?:cuda\.)?OutOfMemoryError|CUDA out of memory|can't allocate memory|DefaultCPUAllocator|"
    r"\bMemoryError\b|std::bad_alloc"
)


@dataclass(frozen=True)
class MemoryFailure:
    outside: bool  # True: the node ran low or the process was killed; retried. False: the job's own allocation.
    why: str

    def sentence(self) -> str:
        if self.outside:
            return f"out of memory, from outside the job: {self.why}; another attempt may fit, so it is retried"
        return (
            f"out of memory inside the job: {self.why}; it asks as much on every attempt, so it is not retried: "
            f"lower train.batch_size, model.latent_dim, model.hidden_dims, eval.iwae_samples or sweep.pack"
        )


# MemoryFailure.sentence() as the job's entry point prints it, read back by the queue from the job's log.
_SAID = re.compile(
    r"out of memory, from outside the job: (?P<outside>.+?); another attempt|"
    r"out of memory inside the job: (?P<inside>.+?); it asks as much"
)


def memory_failure(text: str) -> MemoryFailure | None:
    """How ``text`` (an error, a Ray job message, a log tail) says the job ran out of memory; None if it does not."""
    said = _SAID.search(text)
    if said:
        return MemoryFailure(said["outside"] is not None, said["outside"] or said["inside"])
    for pattern, why in _OUTSIDE:
        if pattern.search(text):
            return MemoryFailure(True, why)
    found = _INSIDE.search(text)
    if found:
        line = next((line.strip() for line in text.splitlines() if found.group(0) in line), found.group(0))
        return MemoryFailure(False, f"an allocation failed ({line[:300]})")
    return None
