"""One small exception hierarchy. Every message says what was wrong and what to do."""

from __future__ import annotations


class NBCERagError(Exception):
    """Base class of every error raised on purpose by nbce-rag."""


class ModelLoadError(NBCERagError):
    """A model or tokenizer could not be found or loaded."""


class PromptTooLongError(NBCERagError, ValueError):
    """The question (with the prompt template) leaves no room in the model's context window."""


class EncoderMismatchError(NBCERagError, ValueError):
    """Stored data (an index, a calibration) was made with another encoder than the one given."""


class InvalidTextError(NBCERagError, ValueError):
    """A text (a question, a passage, a stop string...) is not valid Unicode: a lone surrogate or
    an undecodable byte (as Python keeps invalid UTF-8 of command-line arguments). ``field``
    names the argument or request field it came in."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


class CorruptFileError(NBCERagError):
    """A stored file is missing, truncated or inconsistent."""


class CalibrationError(NBCERagError, ValueError):
    """Calibration data is insufficient or malformed."""


class ConfigError(NBCERagError, ValueError):
    """An option has a value outside its documented range."""


class LockTimeoutError(NBCERagError, TimeoutError):
    """Another writer held a stored file's lock (e.g. an index being saved) for longer than the timeout."""


class ConflictError(NBCERagError):
    """A save would overwrite changes another writer made meanwhile; nothing was written."""


class StoreError(NBCERagError):
    """Something a command exists to store could not be written (a path that is a file, no
    permission, a full disk); nothing usable was stored."""
