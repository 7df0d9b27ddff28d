"""diffsplit: split diffusion workflows between this machine and remote GPU workers."""

__version__ = "0.1.0"
