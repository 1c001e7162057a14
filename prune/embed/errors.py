"""The one error every weights lookup raises, so the CLI can report it as the user's to fix."""


class WeightsNotFoundError(FileNotFoundError):
    """The configured weights are not on this machine."""
