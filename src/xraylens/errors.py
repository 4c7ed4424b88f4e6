"""One exception type for user mistakes: the CLI prints its message on one line and exits 2."""


class XraylensError(Exception):
    """A problem the user can fix (bad path, malformed CSV, unknown model name...).

    The message must say what is wrong and what to do, in one line.
    """


class DecodeError(XraylensError):
    """A single file could not be decoded; data sources count and report these, never crash."""
