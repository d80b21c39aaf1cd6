"""ldmrt: a compiled inference runtime for Latent Diffusion Models."""
import os
from pathlib import Path

__version__ = "0.1.0"


def cache_root() -> Path:
    """Where ldmrt keeps what it can rebuild (engines made by `ldmrt generate`, the C++ library, TensorRT
    timing caches): $LDMRT_CACHE, else $XDG_CACHE_HOME/ldmrt, else ~/.cache/ldmrt."""
    if os.environ.get("LDMRT_CACHE"):
        return Path(os.environ["LDMRT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ldmrt"


def load_model(*args, **kwargs):
    """See `ldmrt.checkpoint.load_model`."""
    from .checkpoint import load_model as _load_model
    return _load_model(*args, **kwargs)
