"""Every error ldmrt raises on purpose: the bottom layer, imported by all the others and importing none.

Each message names the problem and the fix. The CLI turns any `LdmrtError` into `ldmrt CMD: error: ...` and
exit status 2; anything else is a bug in ldmrt and keeps its traceback. The classes also derive from the
builtin a caller would catch for the same mistake (ValueError, FileNotFoundError, OSError, RuntimeError).
"""


class LdmrtError(Exception):
    """Base of the errors below."""


class ConfigError(LdmrtError, ValueError):
    """A model config that ldmrt cannot read or build."""


class CheckpointError(LdmrtError, ValueError):
    """A checkpoint that cannot be read, or does not fit the model config."""


class TokenizerNotFoundError(LdmrtError, FileNotFoundError):
    """The files a tokenizer is built from are missing."""


class EngineError(LdmrtError, ValueError):
    """An engine folder that cannot be used here, with how to rebuild it."""


class InputError(LdmrtError, ValueError):
    """A request that this engine cannot run as given (prompt, sizes, images, sampler settings)."""


class ResourceError(InputError):
    """A request or model larger than this machine can hold, with the estimate and the limit."""


class OutputError(LdmrtError, OSError):
    """A file that cannot be written where the user asked (read-only, full disk, a folder in the way)."""


class NumericalError(LdmrtError, RuntimeError):
    """NaN or inf appeared while sampling: the image would be garbage."""


class BusyError(LdmrtError, RuntimeError):
    """A server that cannot take the request now (queue full, shutting down): retry later or elsewhere."""
