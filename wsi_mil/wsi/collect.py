"""Which slides a command works on: files, folders of slides and CSV slide lists."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..errors import EmptyInputError, WsiMilError
from .slide import SLIDE_SUFFIXES, slide_id

log = logging.getLogger("wsi_mil")


@dataclass(frozen=True)
class SlideEntry:
    """One slide named on the command line or in a slide list, with its optional mpp override."""

    path: Path
    mpp: float | None = None

    def __post_init__(self) -> None:
        if self.mpp is not None and not self.mpp > 0:  # NaN too
            raise WsiMilError(f"{self.path}: mpp {self.mpp} is not a positive um/px; give e.g. --mpp 0.25")

    @property
    def name(self) -> str:
        return slide_id(self.path)


def _slides_in(folder: Path) -> list[Path]:
    """Slide files directly inside `folder`; a DICOM series folder (.dcm files) counts as one slide."""
    found = []
    for q in sorted(folder.iterdir()):
        if q.name.startswith("."):
            continue
        if q.is_file() and q.suffix.lower() in SLIDE_SUFFIXES and q.suffix.lower() != ".dcm":
            found.append(q)
        elif q.is_dir() and q.suffix.lower() != ".mrxs" and any(q.glob("*.dcm")):
            found.append(sorted(q.glob("*.dcm"))[0])  # OpenSlide opens a series from any member
    if not found and any(folder.glob("*.dcm")):
        found.append(sorted(folder.glob("*.dcm"))[0])
    return found


def collect_slides(inputs: list[str | Path], mpp: float | None = None) -> list[SlideEntry]:
    """Expand files, folders (slides directly inside) and CSV slide lists into slide entries.

    A CSV needs a `path` (or `slide`) column and may carry an `mpp` column. Two slides whose
    outputs would share a name (`a/case.svs`, `b/case.tif`) are an error naming both.
    """
    import pandas as pd

    entries: list[SlideEntry] = []
    for item in inputs:
        p = Path(item)
        if p.suffix.lower() == ".csv" and p.is_file():
            table = pd.read_csv(p)
            col = next((c for c in ("path", "slide_path", "slide") if c in table.columns), None)
            if col is None:
                raise EmptyInputError(f"{p}: a slide list needs a 'path' column (and optional 'mpp')")
            for _, row in table.iterrows():
                sp = Path(str(row[col]))
                if not sp.is_absolute():
                    sp = p.parent / sp
                row_mpp = row.get("mpp") if "mpp" in table.columns else None
                row_mpp = float(row_mpp) if row_mpp is not None and not pd.isna(row_mpp) else mpp
                entries.append(SlideEntry(sp, row_mpp))
        elif p.is_dir() and p.suffix.lower() != ".mrxs":
            found = _slides_in(p)
            subdirs = [d for d in sorted(p.iterdir()) if d.is_dir() and not d.name.startswith(".")]
            nested = [q for d in subdirs for q in _slides_in(d)]
            nested = [q for q in nested if q not in found]  # a DICOM series folder is one slide above
            if not found:
                where = (
                    f"; its subfolders hold {len(nested)}: pass them ({p}/*/) or a CSV slide list"
                    if nested
                    else ""
                )
                raise EmptyInputError(
                    f"{p}: no slides found (looked for {', '.join(sorted(SLIDE_SUFFIXES))}){where}"
                )
            if nested:
                log.warning(
                    "%s: %d slide(s) in its subfolders are left out (pass %s/*/ to include them)",
                    p,
                    len(nested),
                    p,
                )
            entries.extend(SlideEntry(q, mpp) for q in found)
        elif p.exists():
            entries.append(SlideEntry(p, mpp))
        else:
            hint = (
                " (flags such as --overwrite take no value: write --overwrite, not --overwrite true)"
                if p.name.lower() in {"true", "false", "yes", "no", "0", "1"}
                else ""
            )
            raise EmptyInputError(f"{p}: no such slide file, folder or CSV slide list{hint}")
    if not entries:
        raise EmptyInputError("no slides given: name slide files, a folder or a CSV slide list")
    return _unique(entries)


def _unique(entries: list[SlideEntry]) -> list[SlideEntry]:
    """Drop exact repeats; refuse two different files that would write the same outputs."""
    seen: dict[str, SlideEntry] = {}
    out = []
    for e in entries:
        prev = seen.get(e.name)
        if prev is None:
            seen[e.name] = e
            out.append(e)
        elif prev.path.resolve() != e.path.resolve():
            raise WsiMilError(
                f"{prev.path} and {e.path}: both slides are named {e.name!r} and would overwrite "
                "each other's outputs; rename one or run them into different --out folders"
            )
    return out
