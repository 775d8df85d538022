"""The one exception type the library raises for bad input.

The CLI prints its message as a single line and exits non-zero; library users
catch it like any other exception.
"""


class MultiflowError(Exception):
    """Bad input or a checkpoint multiflow cannot use; the message says what to do."""
