"""The one exception type users see: a one-line message that names the file, field or flag and the problem."""

from __future__ import annotations


class SimbaError(Exception):
    """Bad input or an unusable file. The CLI prints it as one line and exits with code 2.

    field: the setting the message is about, when it is about one ("flops", "schedule.flops",
    "finetune.batch_size"); the message then starts with it, so that a caller holding the settings in a larger
    object can say where (within) and the CLI can name its flag instead (renamed).
    """

    def __init__(self, message: str, field: str | None = None):
        if field is not None and not message.startswith(field):
            message = f"{field}: {message}"
        super().__init__(message)
        self.field = field

    def within(self, section: str) -> SimbaError:
        """The same error about `section.field` (a settings object held in `section` of a larger one)."""
        if self.field is None:
            return self
        return SimbaError(f"{section}.{self}", f"{section}.{self.field}")

    def renamed(self, name: str) -> SimbaError:
        """The same error with its field called `name` (the CLI's flag, or "FILE: key")."""
        if self.field is None:
            return self
        return SimbaError(name + str(self)[len(self.field):])
