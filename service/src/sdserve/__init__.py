"""sdserve: a text-to-image service for Stable Diffusion nodes."""

__version__ = "0.1.0"
