"""Fault injection for the resume tests: kill this process with SIGKILL at a named point, the n-th time.

``FLEXLORA_FAULT=<point>:<n>`` (points: ``step``, ``event``, ``checkpoint_write``, ``validation``) makes the
n-th passage through that point end the process as a node failure would: no exception, no cleanup. Unset
(always, outside tests) it is a dictionary lookup. ``checkpoint_write`` cuts the file being written to half
its length first, so the kill leaves a torn temporary file behind as a real crash mid-write would.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from typing import IO, Any

_passages: Counter[str] = Counter()


def fault_point(name: str, handle: IO[Any] | None = None) -> None:
    spec = os.environ.get("FLEXLORA_FAULT")
    if not spec:
        return
    point, _, count = spec.partition(":")
    if point != name:
        return
    _passages[name] += 1
    if _passages[name] != int(count or 1):
        return
    if handle is not None:  # tear the half-written file
        handle.flush()
        handle.truncate(max(0, handle.tell() // 2))
        handle.flush()
    os.kill(os.getpid(), signal.SIGKILL)
