"""`manifest_<stage>.csv`: one row per slide with its latest outcome in a work folder.

Several processes (or cluster workers) may share one work folder: each `record` takes an
exclusive `flock` on `.locks/<manifest>.lock`, re-reads the file, replaces only its own slide's row
and writes the table back atomically, so no process overwrites another's rows.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
from pathlib import Path

from ..io import atomic_path

MANIFEST_FIELDS = ["slide", "status", "patches", "seconds", "patches_per_s", "attempts", "error"]


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive advisory lock held for the block (released if the process dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _read_rows(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    with open(path, newline="") as fh:
        return {row["slide"]: row for row in csv.DictReader(fh)}


class Manifest:
    """Per-work-folder CSV of slide outcomes, merged across concurrent writers."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.lock = self.path.parent / ".locks" / (self.path.name + ".lock")
        self.rows: dict[str, dict] = _read_rows(self.path)

    def record(
        self,
        slide: str,
        status: str,
        patches: int | None = None,
        seconds: float | None = None,
        error: str = "",
        attempts: int | None = None,
        extra: dict | None = None,
    ) -> None:
        """Replace `slide`'s row; `extra` adds columns (quality control's `qc_*` fractions)."""
        pps = (patches / seconds) if patches and seconds else None
        row = {
            "slide": slide,
            "status": status,
            "patches": "" if patches is None else patches,
            "seconds": "" if seconds is None else f"{seconds:.2f}",
            "patches_per_s": "" if pps is None else f"{pps:.1f}",
            "attempts": "" if attempts is None else attempts,
            "error": error,
            **(extra or {}),
        }
        with file_lock(self.lock):
            self.rows = _read_rows(self.path)
            self.rows[slide] = row
            more = sorted({k for r in self.rows.values() for k in r} - set(MANIFEST_FIELDS))
            with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as fh:
                writer = csv.DictWriter(fh, MANIFEST_FIELDS + more, extrasaction="ignore", restval="")
                writer.writeheader()
                writer.writerows(self.rows.values())

    def failed(self, slides: list[str] | None = None) -> list[str]:
        names = self.rows if slides is None else [s for s in slides if s in self.rows]
        return [s for s in names if self.rows[s]["status"] == "failed"]
