"""Packages of the wheel: wavflow/*, plus configs/ shipped as `wavflow/configs` (package data;
its group folders model/, encoders/ as `wavflow.configs.<group>`), so an installed WavFlow finds
its default configs from any directory (wavflow/config.py). The rest is in pyproject.toml."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
GROUPS = sorted(d.name for d in (HERE / "configs").iterdir() if d.is_dir() and list(d.glob("*.yaml")))
CONFIG_PACKAGES = ["wavflow.configs", *(f"wavflow.configs.{g}" for g in GROUPS)]

setup(
    packages=[*find_packages(include=["wavflow", "wavflow.*"]), *CONFIG_PACKAGES],
    package_dir={"wavflow.configs": "configs"},
    package_data={name: ["*.yaml"] for name in CONFIG_PACKAGES},
)
