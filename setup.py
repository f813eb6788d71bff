"""Package discovery: every sub-package of stacklock is found, never listed, so none can be left out of the wheel.

The one package that is not a directory of stacklock is the bundled registry: data kept at the top of the
repository in registry/ and carried in the wheel as stacklock._registry (see package-dir in pyproject.toml).
Everything else about the build is in pyproject.toml.
"""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["stacklock", "stacklock.*"]), "stacklock._registry"])
