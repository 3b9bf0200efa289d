"""Sphinx configuration of the pyro_subnet docs: the API reference from the docstrings, the
tutorials and the notes.

Build: ``python -m sphinx -W --keep-going -b html docs docs/_build/html`` (``tests/test_docs.py``
runs the same build, warnings as errors). Nothing is fetched at build time; the pages load MathJax
from its CDN when read.
"""

import os
import sys

import matplotlib

matplotlib.use("Agg")       # autodoc imports the plotting module; never open a window

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "_ext"))
sys.path.insert(0, os.path.dirname(HERE))       # the checkout's package, installed or not

import pyro_subnet  # noqa: E402

project = "pyro_subnet"
author = "the pyro_subnet authors"
copyright = "the pyro_subnet authors"
release = version = pyro_subnet.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "pyro_subnet_docs",
]

root_doc = "index"
exclude_patterns = ["_build"]
templates_path = []
html_theme = "alabaster"
html_static_path = []
html_theme_options = {"description": "Honest, scalable uncertainty for neural networks through Pyro"}

autodoc_member_order = "bysource"
autodoc_default_options = {"show-inheritance": True}
autoclass_content = "class"        # the class docstring states the algorithm and the arguments
autodoc_typehints = "signature"

#: Modules whose ``__all__`` the API pages document under the public name (``automodule``
#: with ``:members:``); ``.. module-reference::`` leaves their objects out of the module pages.
pyro_subnet_public_modules = [
    "pyro_subnet.nn",
    "pyro_subnet.infer",
    "pyro_subnet.infer.mcmc",
    "pyro_subnet.infer.smc",
    "pyro_subnet.infer.analytic",
    "pyro_subnet.infer.links",
    "pyro_subnet.infer.curvature",
    "pyro_subnet.subnet",
    "pyro_subnet.diagnostics",
    "pyro_subnet.diagnostics.plots",
    "pyro_subnet.metrics",
    "pyro_subnet.data",
    "pyro_subnet.distributions",
]
