"""Error hierarchy: every failure flexio reports to a user is one of these, with a message naming the item.

The CLI prints a FlexioError as one line (`flexio CMD: error: ...`) and exits 1, or 2 for a
ParameterError (a usage error: a flag or request field outside its allowed range). The HTTP
server answers a ParameterError with a 400 naming the field.
"""


class FlexioError(Exception):
    """Base of every error flexio raises on purpose; the CLI prints it once and exits non-zero."""


class ParameterError(FlexioError, ValueError):
    """A parameter (CLI flag, API argument, request field) is outside its allowed range or malformed.

    `param` names it (e.g. "--top-p", "max_tokens") when known; the message gives the allowed range and the value.
    """

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class GGUFError(FlexioError):
    """The GGUF file is malformed, truncated, or uses something flexio does not support."""


class UnsupportedError(GGUFError):
    """A valid GGUF file that uses an architecture or tensor type flexio cannot run."""


class NumericalError(FlexioError):
    """The model produced non-finite values (inf/NaN), e.g. from corrupt or out-of-range weight scales."""


class ModelFetchError(FlexioError):
    """A named model could not be fetched into the cache."""


class BudgetError(FlexioError):
    """The memory budget cannot hold what the plan needs, or exceeds the memory this machine has."""


class IOBackendError(FlexioError):
    """A read failed: I/O error, short file, or a range outside the file."""
