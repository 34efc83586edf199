"""One exception type for problems the user can fix; the entry point prints its message without a traceback."""


class FlexLoRAError(ValueError):
    """Bad input or configuration: the message says what is wrong and how to fix it."""
