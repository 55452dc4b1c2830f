"""Build script. The pure-Python package always installs; the CUDA extension (csrc/) is added by the
CUDA build when nvcc is present (see docs/architecture.md)."""
from setuptools import setup

setup()
