"""The one exception type users see: a one-line message that names the file or flag and the problem."""


class SimbaError(Exception):
    """Bad input or an unusable file. The CLI prints it as one line and exits with code 2."""
