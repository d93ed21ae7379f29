"""Maps the design card's `services/` folder onto the `instructrl` import package.

pyproject.toml holds all metadata; this file only lists the sub-packages under
their `instructrl.` names, which `packages.find` cannot rename.
"""
from setuptools import find_packages, setup

setup(packages=["instructrl"] + [f"instructrl.{p}" for p in find_packages("services")])
