"""lightx2v: fast Wan2.1 video generation."""

__version__ = "0.1.0"
