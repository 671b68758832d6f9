"""The library version, in its own module so that submodules can read it during package import."""

__version__ = "0.2.0"
