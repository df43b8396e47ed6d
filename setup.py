"""Which packages a build installs, and under which names (docs/design.md, "Packaging").

Everything else about the project is in pyproject.toml. A wheel (``pip install .``, ``pip wheel .``,
``python -m build``) installs one top-level package, ``attnjax``: the repository's top-level
folders ``kernels_pallas/`` and ``experiments/`` go into it as ``attnjax.kernels_pallas`` and
``attnjax.experiments`` (``attnjax._layout`` finds them there). An editable install
(``pip install -e .``) keeps the checkout's layout, top-level ``kernels_pallas`` and
``experiments``, so that a checkout runs the same with or without it (``python -m
experiments.train`` from the repository root).
"""

import sys

from setuptools import find_packages, setup

FOLDERS = ("kernels_pallas", "experiments")  # attnjax._layout.FOLDERS


def wheel_layout() -> dict:
    packages = find_packages(include=["attnjax", "attnjax.*"])
    for top in FOLDERS:
        packages += [f"attnjax.{name}" for name in find_packages(include=[top, f"{top}.*"])]
    return {"packages": packages, "package_dir": {f"attnjax.{top}": top for top in FOLDERS}}


def checkout_layout() -> dict:
    return {"packages": find_packages(include=["attnjax*", *(f"{top}*" for top in FOLDERS)])}


# setuptools' PEP 660 hook runs this file as `setup.py editable_wheel ...`
setup(**(checkout_layout() if "editable_wheel" in sys.argv else wheel_layout()))
