"""The documentation: the Sphinx site (user guide, pages, API reference from
the docstrings) builds with warnings as errors, and every relative link in
the markdown pages points at a file that exists."""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "benchmarks" / "README.md",
         *sorted((ROOT / "docs").glob("*.md"))]


def test_docs_build_without_warnings(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
       str(ROOT / "docs"), str(tmp_path)], capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  api = (tmp_path / "api.html").read_text()
  for name in ("make_train_step", "scale_by_kfac", "two_level_kfac",
               "fisher_vector_product", "softmax_cross_entropy", "KfacState"):
    assert f"kfac_jax_ext.{name}" in api, name
  assert "Parameters" in api and "Returns" in api      # napoleon rendered Args
  for page in ("guide", "features", "methods", "devices", "performance", "design"):
    assert (tmp_path / f"{page}.html").exists(), page


def test_relative_links_resolve():
  broken = []
  for page in PAGES:
    text = page.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
      if re.match(r"[a-z]+:", target) or target.startswith("#"):
        continue
      path = target.split("#")[0]
      if path and not (page.parent / path).exists():
        broken.append(f"{page.relative_to(ROOT)} -> {target}")
  assert not broken, broken


def test_the_readme_links_the_docs():
  readme = (ROOT / "README.md").read_text()
  for page in ("docs/guide.md", "docs/features.md", "docs/methods.md",
               "docs/devices.md", "docs/performance.md", "docs/design.md",
               "benchmarks/README.md"):
    assert f"]({page}" in readme, page
