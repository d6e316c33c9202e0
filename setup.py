"""The one part of the package layout pyproject.toml cannot express: the top-level ``configs/``
directory ships inside the package as ``bitgen/configs`` (so a regular install or a wheel finds
``demo_cpu`` and the paper configs), next to every ``bitgen`` package found in the tree (new
subpackages need no edit here). Everything else is declared in pyproject.toml."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["bitgen", "bitgen.*"]), "bitgen.configs"],
    package_dir={"bitgen.configs": "configs"},
    package_data={"bitgen": ["assets/**/*"], "bitgen.configs": ["*.py"]},
)
