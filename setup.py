"""Packages of the wheel: wavflow/*, plus configs/ shipped as `wavflow/configs` (package data),
so an installed WavFlow finds its default configs from any directory (wavflow/config.py).
The rest of the metadata is in pyproject.toml."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["wavflow", "wavflow.*"]), "wavflow.configs"],
    package_dir={"wavflow.configs": "configs"},
    package_data={"wavflow.configs": ["*.yaml", "*/*.yaml"]},
)
