"""MkDocs hooks (mkdocs.yml `hooks:`) that keep the site tied to the code it explains.

1. Source pages: the model files (olmoe.py, flexolmo.py), the modules beside them (olmoe_tokenizer.py,
   olmoe_checkpoint.py, olmoe_cli.py, olmoe_speedups.py, olmoe_compiler.py, olmoe_int8.py, olmoe_gguf.py) and
   demo/analysis.py are published as `source/<stem>.md`, one code block whose line numbers are anchors (`#L120`;
   `#L120-L135` highlights a range, see assets/source-lines.js).
2. Code links: in a page, `[route()](olmoe.py#route)` becomes a link to the lines of `route` in the source page,
   found with `ast` when the site is built, so links follow the code when it moves; every published file works the
   same way (`[hf_to_ours](olmoe_checkpoint.py#hf_to_ours)`). A dotted name reaches methods and class fields
   (`olmoe.py#SparseMoeBlock.__call__`, `olmoe.py#OlmoeConfig.norm_topk_prob`); a banner section name reaches a whole
   section (`olmoe.py#losses`). A name that does not exist fails the build.
3. Snippet output: a line `{{ output: snippets/x.py }}` runs docs/snippets/x.py (from the repository root, as the
   tests do) and shows what it printed; `{{ markdown: snippets/x.py }}` inserts the printed text as Markdown (tables).
   Outputs are cached by the content of the snippet and of the files it depends on (the project's modules when it
   imports one of them, demo/ and models/ when it uses them). A snippet that needs a
   file (a line `# requires: models/olmoe-demo/config.json`) shows a note instead while the file does not exist.
4. Notebooks: each docs/notebooks/<name>.py (a "Build it" solution in jupytext's percent format: `# %%` starts a code
   cell, `# %% [markdown]` a text cell) is also published as `notebooks/<name>.ipynb`, converted by jupytext when the
   site is built, so the notebooks and the solutions the page shows are one source. Each tutorial snippet becomes
   `notebooks/tutorial/<name>.ipynb` the same way, after a first cell that moves to the repository root as the tests
   run snippets, and its output block links to it. tests/test_build_notebooks.py runs the same conversion and executes
   every notebook.
5. Demo material: `{{ include: demo/RESULTS.md }}` inserts that file when it exists; `{{ figure: NAME.png | caption }}`
   shows a figure that demo/figures.py draws into the site at build time (and collapse.png, which demo/collapse.py
   draws from its cached logs in demo/collapse/). Where they do not exist yet the page says which script produces
   them.
"""
from __future__ import annotations
import ast, contextlib, hashlib, io, logging, os, re, runpy, shutil, subprocess, sys, tempfile
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
MODULES = ("olmoe.py", "flexolmo.py", "olmoe_tokenizer.py", "olmoe_checkpoint.py", "olmoe_cli.py", "olmoe_speedups.py",
           "olmoe_compiler.py", "olmoe_int8.py", "olmoe_gguf.py")   # the project's modules, the model files first
SOURCES = (*MODULES, "demo/analysis.py")                      # published as source/<stem>.md
CACHE = Path(tempfile.gettempdir()) / "olmoe-tinygrad-docs"
log = logging.getLogger("mkdocs.hooks.olmoe_docs")


# ============================================ code links ============================================

def _named_nodes(body) -> dict[str, ast.AST]:
  """Definitions in a module or class body by name: functions, classes, assignments, annotated fields, also those
  made under an `if` or a `try` (`if _IMPORTED: class ...`)."""
  out: dict[str, ast.AST] = {}
  for node in body:
    if isinstance(node, (ast.If, ast.Try)):
      handlers = [h.body for h in getattr(node, "handlers", [])]
      for part in (node.body, node.orelse, *handlers, getattr(node, "finalbody", [])):
        for name, inner in _named_nodes(part).items(): out.setdefault(name, inner)
    elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)): out[node.name] = node
    elif isinstance(node, ast.Assign):
      for t in node.targets:
        if isinstance(t, ast.Name): out[t.id] = node
    elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name): out[node.target.id] = node
  return out

def _sections(lines: list[str]) -> dict[str, tuple[int, int]]:
  """Banner sections such as `# ====== losses ======` -> {"losses": (first line, last line)} (1-based)."""
  starts = [(i + 1, m[1].strip()) for i, l in enumerate(lines) if (m := re.fullmatch(r"#\s*=+\s*([^=]+?)\s*=+\s*", l))]
  out = {}
  for n, (start, name) in enumerate(starts):
    end = starts[n + 1][0] - 1 if n + 1 < len(starts) else len(lines)
    while end > start and not lines[end - 1].strip(): end -= 1
    out[re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")] = (start, end)
  return out

@lru_cache(maxsize=None)
def _parsed(path: Path, mtime: float) -> tuple[ast.Module, list[str]]:
  text = path.read_text(encoding="utf-8")
  return ast.parse(text), text.splitlines()

def symbol_lines(filename: str, symbol: str) -> tuple[int, int]:
  """(first, last) line, 1-based, of `symbol` in the repository file `filename` (decorators included).

  `symbol` is a name, a dotted path into classes (`SparseMoeBlock.__call__`), or a banner section (`losses`).
  Raises KeyError when there is no such symbol."""
  path = ROOT / filename
  tree, lines = _parsed(path, path.stat().st_mtime)
  node, scope = None, tree.body
  for part in symbol.split("."):
    node = _named_nodes(scope).get(part)
    if node is None: break
    scope = getattr(node, "body", [])
  if node is not None:
    first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    return first, node.end_lineno
  sections = _sections(lines)
  if symbol in sections: return sections[symbol]
  raise KeyError(f"{filename} has no symbol or section {symbol!r}")

LINK = re.compile(r"\]\((?P<file>" + "|".join(re.escape(s) for s in SOURCES) + r")(?:#(?P<sym>[A-Za-z_][\w.-]*))?\)")

def rewrite_code_links(markdown: str, src_uri: str, anchors: dict[str, set] | None = None) -> str:
  """Turn `](olmoe.py#sym)` into `](<relative>/source/olmoe.md#L<a>-L<b> "olmoe.py, lines a-b")`; the anchors used
  are added to `anchors[stem]`, so that MkDocs' anchor validation knows the source page has them."""
  depth = src_uri.count("/")
  def sub(m: re.Match) -> str:
    stem = Path(m["file"]).stem
    target = "../" * depth + f"source/{stem}.md"
    if m["sym"] is None: return f"]({target})"
    a, b = symbol_lines(m["file"], m["sym"])
    if anchors is not None: anchors.setdefault(stem, set()).add(f"L{a}-L{b}")
    return f']({target}#L{a}-L{b} "{m["file"]}, lines {a}–{b}")'
  return LINK.sub(sub, markdown)


# ============================================ source pages ============================================

def source_page(filename: str) -> str:
  text = (ROOT / filename).read_text(encoding="utf-8")
  fence = "`" * 4
  return (f"---\nhide:\n  - navigation\n  - toc\n---\n\n# {filename}\n\n"
          f"The complete file. The tutorial's links land on the lines they explain (`#L120-L135` picks out a range); "
          f"click a line number to link to it.\n\n"
          f"{fence} python linenums=\"1\"\n{text.rstrip()}\n{fence}\n")


# ============================================ snippets ============================================

def _files(folder: str) -> list[Path]:
  root = ROOT / folder
  if not root.is_dir(): return []
  return sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                and p.suffix not in (".png", ".svg", ".pyc"))

def dependencies(path: Path) -> list[Path]:
  """The repository files a snippet's output can depend on: every project module if it imports one (they import
  each other: flexolmo.py builds on olmoe.py, loading goes through olmoe_checkpoint.py, generation through
  olmoe_speedups.py), demo/ if it imports from there, the bundled models (and the code that runs them) if it
  names one, and the files of its `# requires:` lines."""
  text = path.read_text(encoding="utf-8")
  imported = {a.name.split(".")[0] for node in ast.walk(ast.parse(text)) if isinstance(node, (ast.Import, ast.ImportFrom))
               for a in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])}
  uses_models = "models/" in text
  deps = []
  if imported & {Path(m).stem for m in MODULES} or uses_models: deps += [ROOT / m for m in MODULES]
  if "demo" in imported or uses_models: deps += _files("demo")
  if uses_models: deps += _files("models")
  for name in sorted(imported):                        # another snippet it imports, and what that one uses
    if (other := path.parent / f"{name}.py").is_file() and other != path: deps += [other, *dependencies(other)]
  return deps + [ROOT / r for r in requirements(path)]  # and the files it says it needs

def cache_key(path: Path) -> str:
  """A hash of the snippet, of every file it depends on, and of tinygrad's version."""
  h = hashlib.sha256(path.read_bytes())
  for p in dependencies(path):
    if p.exists(): h.update(str(p.relative_to(ROOT)).encode() + b"\0" + p.read_bytes() + b"\0")
  try:
    import tinygrad
    h.update(getattr(tinygrad, "__version__", "").encode())
  except ImportError: pass
  return h.hexdigest()[:24]

def execute_snippet(path: str | Path) -> tuple[str, dict]:
  """Run a snippet file as a script from the repository root; return (what it printed, its globals)."""
  path = Path(path)
  if not path.is_absolute(): path = DOCS / path
  buf, cwd = io.StringIO(), os.getcwd()
  sys.path[:0] = [str(path.parent), str(ROOT)]       # as `python docs/snippets/x.py` run from the repository root
  os.chdir(ROOT)
  try:
    with contextlib.redirect_stdout(buf):
      env = runpy.run_path(str(path), run_name="__main__")
  finally:
    os.chdir(cwd)
    sys.path.remove(str(path.parent)); sys.path.remove(str(ROOT))
  return buf.getvalue(), env

def requirements(path: Path) -> list[str]:
  """Files a snippet needs, from its `# requires: a b` lines (repository-relative paths)."""
  return [r for m in re.finditer(r"^# requires: (.+)$", path.read_text(encoding="utf-8"), re.M) for r in m[1].split()]

def missing_requirements(path: Path) -> list[str]:
  return [r for r in requirements(path) if not (ROOT / r).exists()]

def cache_file(path: Path) -> Path: return CACHE / f"{path.stem}-{cache_key(path)}.txt"

def store_output(path: Path, out: str) -> None:
  """Cache what a snippet printed (the tests call this too: they run every snippet anyway, so the next site build
  reuses their outputs), replacing older outputs of the same snippet."""
  CACHE.mkdir(parents=True, exist_ok=True)
  for old in CACHE.glob(f"{path.stem}-*.txt"): old.unlink(missing_ok=True)
  cache_file(path).write_text(out, encoding="utf-8")

def snippet_output(rel: str) -> str:
  """What docs/<rel> prints, from the cache when nothing it depends on changed."""
  path = DOCS / rel
  if not path.is_file(): raise FileNotFoundError(f"no snippet {rel} (looked for {path})")
  cached = cache_file(path)
  if cached.exists(): return cached.read_text(encoding="utf-8")
  log.info(f"running {rel}")
  out, _ = execute_snippet(path)
  store_output(path, out)
  return out


# ============================================ notebooks ============================================

NOTEBOOKS = DOCS / "notebooks"

# A snippet runs from the repository root with docs/snippets/ on the path (execute_snippet); a notebook starts in its
# own folder, so its first cell finds the root (the folder with olmoe.py and models/) from there upwards.
SNIPPET_SETUP = """\
# Run from the repository root, as the tests run this snippet, wherever the notebook is inside the checkout.
import os, sys
from pathlib import Path
ROOT = next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "olmoe.py").is_file() and (p / "models").is_dir())
os.chdir(ROOT); sys.path[:0] = [str(ROOT / "docs" / "snippets"), str(ROOT)]
import olmoe_compiler; olmoe_compiler.use_cpu_target()   # a CPU compile target clang can finish (bf16)"""

def notebook_sources() -> list[Path]:
  """The "Build it" solutions, published as notebooks/<name>.ipynb."""
  return sorted(NOTEBOOKS.glob("*.py"))

def snippet_sources() -> list[Path]:
  """The tutorial snippets, published as notebooks/tutorial/<name>.ipynb."""
  return sorted((DOCS / "snippets").glob("*.py"))

def notebook_uri(path: Path) -> str:
  """Where the site publishes a source's notebook, relative to the docs folder."""
  return f"notebooks/tutorial/{path.stem}.ipynb" if path.parent.name == "snippets" else f"notebooks/{path.stem}.ipynb"

def notebook_json(path: Path) -> str:
  """The .ipynb text of a percent-format source (a snippet gets the cell SNIPPET_SETUP first), with the standard
  Python kernel named so that Jupyter opens it as is."""
  import jupytext, nbformat
  nb = jupytext.read(path, fmt="py:percent")
  if path.parent.name == "snippets":
    nb.cells[:0] = [nbformat.v4.new_markdown_cell(f"`docs/snippets/{path.name}`, a snippet of the course; the page "
                                                  "shows what it prints."), nbformat.v4.new_code_cell(SNIPPET_SETUP)]
  nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
  return jupytext.writes(nb, fmt="ipynb")


# ============================================ demo material ============================================

FIGURES_SCRIPT = ROOT / "demo" / "figures.py"
COLLAPSE_SCRIPT = ROOT / "demo" / "collapse.py"              # --plot: collapse.png from the logs in demo/collapse/

def build_figures() -> Path | None:
  """Run demo/figures.py into a cached folder (once per change of the code, demo/ or models/); None if it does not
  exist."""
  if not FIGURES_SCRIPT.exists(): return None
  h = hashlib.sha256()
  for p in [ROOT / s for s in SOURCES] + _files("demo") + _files("models"):
    h.update(str(p.relative_to(ROOT)).encode() + b"\0" + p.read_bytes() + b"\0")
  out = CACHE / f"figures-{h.hexdigest()[:24]}"
  if not (out / ".done").exists():
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    log.info("drawing the figures with demo/figures.py")
    r = subprocess.run([sys.executable, str(FIGURES_SCRIPT), "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0: raise RuntimeError(f"demo/figures.py failed:\n{r.stderr[-3000:]}")
    if COLLAPSE_SCRIPT.exists() and (ROOT / "demo" / "collapse" / "setup.json").exists():
      r = subprocess.run([sys.executable, str(COLLAPSE_SCRIPT), "--plot", str(out)], cwd=ROOT, capture_output=True, text=True)
      if r.returncode != 0: raise RuntimeError(f"demo/collapse.py --plot failed:\n{r.stderr[-3000:]}")
    (out / ".done").touch()
  return out

def shift_headings(markdown: str, by: int = 1) -> str:
  """Demote the Markdown headings of an included file (outside code fences) so they nest under the page's."""
  out, fenced = [], False
  for line in markdown.splitlines():
    if line.lstrip().startswith(("```", "~~~")): fenced = not fenced
    out.append("#" * by + line if not fenced and re.match(r"#{1,5} ", line) else line)
  return "\n".join(out)


# ============================================ the hooks ============================================

STATE: dict = {}
MARKER = re.compile(r"^([ \t]*)\{\{\s*(output|markdown|include|figure):\s*(.+?)\s*\}\}[ \t]*$", re.M)

def on_pre_build(config, **kw):
  if str(ROOT) not in sys.path: sys.path.append(str(ROOT))
  import olmoe_compiler                          # snippets and figures compile kernels: a target clang can finish
  olmoe_compiler.use_cpu_target()
  snippets = str(DOCS / "snippets")
  for name, mod in list(sys.modules.items()):    # `mkdocs serve`: snippets see the code as it is now
    if name in {Path(m).stem for m in MODULES} | {"demo"} or name.startswith("demo.") or \
       str(getattr(mod, "__file__", None) or "").startswith(snippets): del sys.modules[name]
  _parsed.cache_clear()
  STATE["anchors"] = {Path(s).stem: set() for s in SOURCES}   # line ranges the pages link to, per source page
  STATE["figures"] = build_figures()

def on_files(files, config, **kw):
  from mkdocs.structure.files import File
  for name in SOURCES:
    files.append(File.generated(config, f"source/{Path(name).stem}.md", content=source_page(name)))
  for src in notebook_sources() + snippet_sources():
    files.append(File.generated(config, notebook_uri(src), content=notebook_json(src)))
  if STATE.get("figures"):
    for png in sorted(STATE["figures"].glob("*.png")):
      files.append(File.generated(config, f"figures/{png.name}", abs_src_path=str(png)))
  return files

def on_page_markdown(markdown, page, config, files, **kw):
  from mkdocs.exceptions import PluginError
  src = page.file.src_uri
  if src.startswith("source/"): return markdown
  depth = src.count("/")
  def marker(m: re.Match) -> str:           # a marker indented inside an admonition keeps its indentation
    return "\n".join(m[1] + line if line.strip() else "" for line in expand(m[2], m[3]).rstrip("\n").split("\n"))
  def expand(kind: str, arg: str) -> str:
    if kind in ("output", "markdown"):
      if (DOCS / arg).is_file() and (missing := missing_requirements(DOCS / arg)):
        return (f'!!! note "Output of `{arg}`"\n    This snippet runs on `{missing[0]}`, which is not in this copy of the '
                f"repository yet; the site shows its output here once it is.\n")
      try: out = snippet_output(arg)
      except Exception as e: raise PluginError(f"{src}: snippet {arg} failed: {e.__class__.__name__}: {e}") from e
      block = out.rstrip() + "\n" if kind == "markdown" else f'``` text title="printed by {arg}"\n{out.rstrip()}\n```\n'
      if arg.startswith("snippets/"):    # the snippet as a notebook, published by on_files
        block += f"\n*Run it as a notebook: [{Path(arg).stem}.ipynb]({'../' * depth}{notebook_uri(DOCS / arg)})*\n"
      return block
    if kind == "include":
      path = ROOT / arg
      if path.exists(): return shift_headings(path.read_text(encoding="utf-8")) + "\n"
      return (f'!!! note "Filled in from `{arg}`"\n    This part of the page is `{arg}`, which the demo scripts in '
              f"`demo/` write when they train the bundled models; it is not in this copy of the repository yet.\n")
    name, _, caption = (s.strip() for s in arg.partition("|"))
    if STATE.get("figures") and (STATE["figures"] / name).exists():
      return f"![{caption}]({'../' * depth}figures/{name})\n\n*{caption}*\n"
    if STATE.get("figures"):
      raise PluginError(f"{src}: demo/figures.py drew no {name} (it drew: "
                        f"{', '.join(p.name for p in STATE['figures'].glob('*.png')) or 'nothing'})")
    return (f'!!! note "Figure: {caption}"\n    `python demo/figures.py --out DIR` draws `{name}` from the bundled '
            f"models; the site shows it here once `demo/figures.py` exists.\n")
  markdown = MARKER.sub(marker, markdown)
  try: return rewrite_code_links(markdown, src, STATE["anchors"])
  except KeyError as e: raise PluginError(f"{src}: {e.args[0]}") from None

def on_page_content(html, page, **kw):
  if page.file.src_uri.startswith("source/"):   # line-number anchors as #L<n>, the way code hosts spell them
    html = re.sub(r"__codelineno-0-(\d+)", r"L\1", html)
    # the ranges (#L120-L135) exist through assets/source-lines.js: declare them so MkDocs validates links to them
    ranges = STATE["anchors"][Path(page.file.src_uri).stem]
    ranges |= page.present_anchor_ids | set(re.findall(r'id="(L\d+)"', html))
    page.present_anchor_ids = ranges           # the same set object: ranges linked from pages read later join it
  return html
