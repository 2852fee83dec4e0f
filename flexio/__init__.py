"""flexio: run GGUF language models larger than memory at the speed of the SSD.

Importing flexio points Numba's on-disk kernel cache at flexio's user cache
(`<cache>/numba`, `$FLEXIO_CACHE` or `~/.cache/flexio`) unless NUMBA_CACHE_DIR is set:
the kernels compile once (a minute or two) and every later process loads them in
about a second, also when the installed package's own directory is not writable.
"""

import os as _os
import sys as _sys


def cache_root() -> str:
    """flexio's user cache: $FLEXIO_CACHE, else $XDG_CACHE_HOME/flexio or ~/.cache/flexio (not created here)."""
    return _os.environ.get("FLEXIO_CACHE") or _os.path.join(
        _os.environ.get("XDG_CACHE_HOME") or _os.path.expanduser("~/.cache"), "flexio")


def _kernel_cache() -> None:
    if "NUMBA_CACHE_DIR" in _os.environ:
        return
    _os.environ["NUMBA_CACHE_DIR"] = _os.path.join(cache_root(), "numba")
    config = _sys.modules.get("numba.core.config")
    if config is not None:  # numba was imported first: its config has already read the environment
        config.CACHE_DIR = _os.environ["NUMBA_CACHE_DIR"]


_kernel_cache()
