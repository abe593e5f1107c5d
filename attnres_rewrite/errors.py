"""Errors a user can cause, each saying what was wrong and what to do.

Everything raised for bad user input derives from :class:`AttnResError` (and from
``ValueError`` or ``TypeError`` where that is the natural kind), so the CLI can turn
it into a one-line message and exit code 2 instead of a traceback.
"""


class AttnResError(Exception):
    """Base of every user-facing error of attnres-rewrite."""


class InvalidInputError(AttnResError, ValueError):
    """Arguments or example inputs of the wrong value, shape or kind."""


class OutputError(AttnResError, OSError):
    """An output cannot be written there: in the way, protected, not writable, or the disk is full."""


class TraceError(AttnResError, RuntimeError):
    """The model could not be captured with torch.export; the message says what to try."""


class NoResidualStreamError(AttnResError, ValueError):
    """The model has no residual stream at all."""


class NotConvertibleError(AttnResError, ValueError):
    """Streams were found but none can be converted (post-norm, post-activation...)."""


class AdapterError(AttnResError, ValueError):
    """A saved adapter is missing, corrupted, or does not match the model."""


class ExportError(AttnResError, RuntimeError):
    """ONNX export failed, or was asked for something it cannot do."""


class NotExportableError(ExportError):
    """The model runs but cannot be expressed in ONNX: ``torch.export`` cannot capture it, or the
    exporter has no translation for one of its ops.

    Not a user mistake: the CLI exits with 1 for it, not 2, and the message says
    ``... is not exportable to ONNX because ...``.
    """


class VerificationError(ExportError):
    """An exported model ran but its outputs differ from PyTorch beyond tolerance.

    Not a user mistake but a failed check: the CLI exits with 1 for it, not 2, and the
    message carries the numbers.
    """


class ModelSourceError(AttnResError, ValueError):
    """A MODEL argument (samples:NAME, a directory, module:factory) could not be resolved."""
