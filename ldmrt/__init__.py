"""ldmrt: a compiled inference runtime for Latent Diffusion Models."""
__version__ = "0.1.0"


def load_model(*args, **kwargs):
    """See `ldmrt.checkpoint.load_model`."""
    from .checkpoint import load_model as _load_model
    return _load_model(*args, **kwargs)
