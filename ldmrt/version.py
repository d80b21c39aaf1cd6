"""The one version number of ldmrt's Python side (CMakeLists.txt reads pyproject.toml's, which must match)."""
__version__ = "0.1.0"
