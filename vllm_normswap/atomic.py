"""Replace a text file atomically: write a temporary file in the same folder, flush it to disk, rename it over the
target (``os.replace``). A reader sees the old file or the new one, never half of one, and a crash or a kill
mid-write leaves the old file. Standard library only, so every room can use it: the A/B's results.json and report
(ab/record.py, ab/report.py) and the int8 kernel plan cache (quant/plan_cache.py), which a worker may write while
another reads it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
