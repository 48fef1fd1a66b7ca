"""Builds the package; the compiled kernels in csrc/ are added by the csrc issue."""

from setuptools import setup

setup()
