"""The one exception type for bad user input; the CLI turns it into a one-line message and exit code 2."""


class TitlegenError(Exception):
    """Bad input or configuration: the message names the file, line or field and what was expected."""
