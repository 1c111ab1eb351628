"""Sphinx configuration of geomopt's documentation (built in CI with warnings as errors: ``sphinx-build -W``)."""
import os
import sys

sys.path.insert(0, os.path.abspath(".."))
import geomopt  # noqa: E402

project = "geomopt"
author = "The geomopt authors"
copyright = "the geomopt authors, Apache-2.0"  # noqa: A001 (Sphinx's name)
release = version = geomopt.__version__

extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax"]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build"]
myst_heading_anchors = 3
suppress_warnings = ["myst.header"]  # README's sections are included below a page title; their levels stay
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
html_theme = "alabaster"
html_static_path: list = []
