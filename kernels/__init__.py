"""Triton kernels (installed as `ldmrt.kernels`), each beside its torch reference in `ldmrt.models.ops`."""
