"""The one exception type that the CLI turns into a clear message and a non-zero exit."""


class RedrafterError(ValueError):
    """Bad input or an unusable model or drafter; the message says what and where."""
