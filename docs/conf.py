"""Sphinx configuration: the user guide and pages (markdown, MyST) and the
API reference from the docstrings (autodoc + napoleon, Google style).

Build: ``pip install -e ".[docs]" && python -m sphinx -W -b html docs docs/_build``
(``tests/test_docs.py`` builds it with warnings as errors).
"""

project = "kfac_jax_ext"
author = "kfac_jax_ext developers"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "myst_parser"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]
autodoc_member_order = "bysource"
autodoc_typehints = "none"          # the signatures and Args sections say it
napoleon_google_docstring = True
napoleon_numpy_docstring = False
myst_heading_anchors = 3
html_theme = "alabaster"
# The pages link to files outside docs/ (../README.md, ../benchmarks/README.md)
# so that they work on the repository's web view; Sphinx cannot resolve those
# as documents. tests/test_docs.py checks every relative link's target exists.
suppress_warnings = ["myst.xref_missing"]
