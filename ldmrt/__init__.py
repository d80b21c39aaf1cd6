"""ldmrt: a compiled inference runtime for Latent Diffusion Models.

    from ldmrt import Engine, EngineError, CheckpointError, load_model, write_png

The package root is the public face and the top of the import graph: nothing inside ldmrt imports it. Its
names load on first use, so `import ldmrt` stays cheap (no torch until a model or engine is asked for).
"""
from .errors import (CheckpointError, ConfigError, EngineError, InputError, LdmrtError, NumericalError,  # noqa: F401
                     OutputError, ResourceError, TokenizerNotFoundError)
from .files import cache_root  # noqa: F401
from .version import __version__  # noqa: F401

_LAZY = {"Engine": "engine", "load_model": "checkpoint", "save_checkpoint": "checkpoint", "write_png": "images"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Engine", "load_model", "save_checkpoint", "write_png", "LdmrtError", "EngineError", "CheckpointError", "ConfigError",
           "TokenizerNotFoundError", "InputError", "ResourceError", "OutputError", "NumericalError", "cache_root",
           "__version__"]
