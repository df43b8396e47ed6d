"""Where the repository's other top-level folders are when attnjax runs (docs/design.md, "Packaging").

A checkout (and an editable install) imports ``kernels_pallas`` and ``experiments`` as the
top-level packages they are in the repository. A wheel installs nothing beside ``attnjax``: the
same folders are installed as ``attnjax.kernels_pallas`` and ``attnjax.experiments``. Both
packages import themselves relatively, so their code is the same in either place; code outside
them finds them here. At most one of the two names exists in an environment, so a module is
never loaded twice under two names.
"""

from __future__ import annotations

import importlib
from types import ModuleType

FOLDERS = ("kernels_pallas", "experiments")


def folder(name: str) -> ModuleType:
    """The module ``name`` (``"kernels_pallas.flash"``, ``"experiments.train"``): from inside an
    installed wheel if attnjax is one, else from the checkout."""
    top = name.partition(".")[0]
    if top not in FOLDERS:
        raise ValueError(f"{name!r} is not in one of the repository's folders {FOLDERS}")
    try:
        return importlib.import_module(f"attnjax.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"attnjax.{top}":  # the wheel's package is there and something it needs is not
            raise
    return importlib.import_module(name)


def train() -> int:
    """The ``attnjax-train`` command: ``python -m experiments.train`` wherever experiments is."""
    return folder("experiments.train").main()
