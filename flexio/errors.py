"""Error hierarchy: every failure flexio reports to a user is one of these, with a message naming the item."""


class FlexioError(Exception):
    """Base of every error flexio raises on purpose; the CLI prints it once and exits non-zero."""


class GGUFError(FlexioError):
    """The GGUF file is malformed, truncated, or uses something flexio does not support."""


class UnsupportedError(GGUFError):
    """A valid GGUF file that uses an architecture or tensor type flexio cannot run."""


class NumericalError(FlexioError):
    """The model produced non-finite values (inf/NaN), e.g. from corrupt or out-of-range weight scales."""


class ModelFetchError(FlexioError):
    """A named model could not be fetched into the cache."""


class BudgetError(FlexioError):
    """The memory budget cannot hold what the plan needs."""


class IOBackendError(FlexioError):
    """A read failed: I/O error, short file, or a range outside the file."""
