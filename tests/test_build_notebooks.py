"""The course's notebooks run: the "Build it" solutions (docs/notebooks/*.py, shown on docs/build.md) and the
tutorial snippets (docs/snippets/*.py), as the notebooks students download from the site.

Each source is converted to .ipynb by jupytext exactly as the site build converts it (`notebook_json` in
docs/hooks.py) and executed by nbclient in a fresh Python kernel whose working folder is docs/notebooks/, so the
first cell's search for the repository root is exercised as a student's Jupyter would exercise it. A failing
`assert` in a notebook (each checks the student's method against olmoe.py's tested functions or numpy, and each
claim of the page's written answers) fails its test. What a "Build it" notebook prints is stored in the docs'
snippet cache, so the site build (tests/test_docs.py, which this file sorts before, and `mkdocs build`) shows it
without running the notebook again; the snippets' own outputs and numbers are tests/test_docs.py's. Every "Build it"
notebook runs in a kernel; of the tutorial snippets' notebooks, a sample does (KERNEL_SAMPLE), since their code is
run by tests/test_docs.py and their one added cell is the same for all."""
import re
import pytest
from test_docs import DOCS, hooks               # docs/hooks.py, loaded once for both files

SOURCES = hooks.notebook_sources()
SNIPPETS = hooks.snippet_sources()
# The tutorial snippets' code runs in tests/test_docs.py; as notebooks they differ only by the setup cell that moves
# to the repository root (checked for every one by test_notebook_conversion_keeps_cells_and_kernel). These run that
# cell in a kernel, once for each way a snippet reaches beyond itself: a bundled model, another snippet, demo/.
KERNEL_SAMPLE = ("quickstart", "memory", "collapse_runs")
CELL_TIMEOUT = 300            # seconds; the longest cell trains a FlexOlmo expert


def execute(src) -> str:
  """Run the notebook of `src` in a fresh kernel started in docs/notebooks/; return what it printed to stdout."""
  pytest.importorskip("jupytext", reason="pip install -e '.[test]' installs jupytext (.ci/run does)")
  nbclient = pytest.importorskip("nbclient", reason="pip install -e '.[test]' installs nbclient and ipykernel (.ci/run does)")
  import nbformat
  nb = nbformat.reads(hooks.notebook_json(src), as_version=4)
  client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                                   resources={"metadata": {"path": str(hooks.NOTEBOOKS)}})
  client.execute()            # raises CellExecutionError, with the cell and its traceback, when a cell fails
  printed = "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
                    if out.get("output_type") == "stream" and out.get("name") == "stdout")
  assert printed.strip(), f"{src.name} printed nothing"
  return printed

@pytest.mark.parametrize("src", SOURCES, ids=[s.stem for s in SOURCES])
def test_notebook_runs(src):
  hooks.store_output(src, execute(src))

@pytest.mark.parametrize("src", [s for s in SNIPPETS if s.stem in KERNEL_SAMPLE], ids=list(KERNEL_SAMPLE))
def test_snippet_notebook_runs(src):
  if missing := hooks.missing_requirements(src): pytest.skip(f"{src.name} runs on {missing[0]}, which is not in this checkout")
  execute(src)


def test_every_notebook_is_on_the_page_with_its_link():
  """Each source is shown on docs/build.md, its output inserted, and its .ipynb linked; each link names a source."""
  page = (DOCS / "build.md").read_text(encoding="utf-8")
  for src in SOURCES:
    rel = f"notebooks/{src.name}"
    assert f'--8<-- "{rel}"' in page and f"{{{{ output: {rel} }}}}" in page, rel
    assert f"](notebooks/{src.stem}.ipynb)" in page, f"build.md does not link {src.stem}.ipynb"
  linked = set(re.findall(r"\]\(notebooks/([\w-]+)\.ipynb\)", page))
  assert linked <= {s.stem for s in SOURCES}, sorted(linked - {s.stem for s in SOURCES})


def test_notebook_conversion_keeps_cells_and_kernel():
  """The conversion the site and the test share: percent cells become notebook cells, code and Markdown, in order."""
  pytest.importorskip("jupytext", reason="pip install -e '.[test]' installs jupytext (.ci/run does)")
  import nbformat
  for src in SOURCES + SNIPPETS:
    nb = nbformat.reads(hooks.notebook_json(src), as_version=4)
    nbformat.validate(nb)
    text = src.read_text(encoding="utf-8")
    kinds = ["markdown" if m else "code" for m in re.findall(r"^# %%( \[markdown\])?", text, re.M)] or ["code"]
    if src in SNIPPETS:       # a snippet has no cell markers: its title and the cell that moves to the root come first
      kinds = ["markdown", "code"] + kinds
      assert nb.cells[1].source == hooks.SNIPPET_SETUP and nb.cells[2].source.strip() == text.strip(), src.name
    assert [c.cell_type for c in nb.cells] == kinds, src.name
    assert nb.metadata["kernelspec"]["name"] == "python3"
