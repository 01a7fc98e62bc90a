"""The project's own error type: every refusal of bad input raises it (or a subclass)."""


class SegDiffError(ValueError):
    """A problem with the input, the model or the settings, with a message naming the fix."""


class ModelFileError(SegDiffError):
    """A model file is missing, corrupted, of another architecture or fails its checksum."""
