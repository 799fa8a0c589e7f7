"""User-facing errors: one clear line naming the file and the fix."""


class WsiMilError(Exception):
    """An input problem the user can fix; the CLI prints its message as one line."""

    exit_code = 2  # bad input


class StoppedAtFailure(WsiMilError):
    """`--fail-fast`: a slide failed; exit status 1, as when slides fail without it."""

    exit_code = 1


class SlideOpenError(WsiMilError):
    """A slide file cannot be opened (unreadable, unknown format)."""


class SlideReadError(WsiMilError):
    """Pixels of an opened slide cannot be decoded (a corrupt tile)."""


class MissingMPPError(WsiMilError):
    """A slide carries no microns-per-pixel and no override was given."""


class EmptyInputError(WsiMilError):
    """A folder or CSV names no slides, or a mask holds no tissue."""
