"""The one exception type users see: its message is a single line that says what to fix."""


class PumaError(Exception):
    """A user-facing failure (bad path, bad config, unreachable party, input too long, ...).

    The CLI prints ``puma: error: <message>`` and exits non-zero; library callers can catch it.
    """
