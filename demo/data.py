#!/usr/bin/env python3
"""The three text domains the demo models are trained on, built from redistributable sources, and the tokenizer.

  domain  what                                                  source and licence
  prose   English paragraphs of the Python 3.11 documentation   the reST sources in Debian's `python3.11-doc` package
          (tutorial, HOWTOs, FAQ, language and library          (/usr/share/doc/python3.11/html/_sources), fetched with
          reference, what's new), markup stripped, code          `apt-get download` when not installed. Python Software
          examples and tables dropped                            Foundation License Version 2 (the docs' examples are also
                                                                 under the Zero-Clause BSD licence).
  code    Python source files of the standard library of the    the running CPython (`sysconfig.get_paths()["stdlib"]`),
          interpreter running this script (tests, demos, IDLE,  PSF License Version 2 (Python's LICENSE lists the
          codec tables and data files left out)                permissive notices of the few incorporated files).
  math    arithmetic lines such as "37 + 48 = 85"               generated here from a seed; no outside source.

Each domain is a list of documents (one reST file, one .py file, one block of 16 arithmetic lines); every tenth
document in sorted order is held out for validation. `build()` writes `<domain>.train.txt` and `<domain>.valid.txt`,
documents separated by `<|endoftext|>` (the tokenizer turns that text into the EOS token), and `manifest.json` with
each file's sha256, the Python and docs versions, and the document counts: rebuilding on the same versions gives the
same bytes. Nothing here is committed; `python demo/data.py --out demo/build/data` rebuilds it (about 20 MB).

`train_tokenizer()` trains the byte-level BPE (NFC, GPT-2 split pattern, `<|endoftext|>` = EOS, `<|padding|>` = pad)
with the `tokenizers` library on an equal share of each domain and saves it as tokenizer.json.

Not handled: other Python versions give other prose and code (the manifest records which); no deduplication.
"""
from __future__ import annotations
import argparse, hashlib, json, re, subprocess, sys, sysconfig, tempfile
from pathlib import Path
import numpy as np

DOMAINS = ("prose", "code", "math")
EOS, PAD = "<|endoftext|>", "<|padding|>"
HOLD_OUT = 10                                   # every 10th document (sorted order) goes to the validation split
DOCS_PACKAGE = "python3.11-doc"
DOCS_DIR = Path("/usr/share/doc/python3.11/html/_sources")
DOCS_PARTS = ("tutorial", "howto", "faq", "reference", "library", "glossary.rst.txt", "using", "extending",
              "whatsnew", "installing", "distributing", "install")


# ================================================ prose ================================================

# directives whose indented body is code, tables or machinery, not prose
SKIP_BODY = {"code-block", "sourcecode", "code", "doctest", "testcode", "testoutput", "testsetup", "testcleanup",
             "productionlist", "literalinclude", "highlight", "index", "toctree", "csv-table", "table", "list-table",
             "raw", "image", "figure", "math", "autosummary", "only", "include", "sectionauthor", "moduleauthor",
             "audit-event", "opcode", "cmdoption", "option", "envvar", "program", "availability", "impl-detail",
             "pdbcommand", "describe", "productionlist", "tabularcolumns", "rubric", "currentmodule", "module"}
ROLE = re.compile(r":[\w:.+-]+:`!?~?([^`<]*?)\s*(?:<[^>`]*>)?`")          # :func:`~os.path.join` -> ~os.path.join
LINK = re.compile(r"`([^`<]+?)\s*(?:<[^>`]*>)?`__?")                      # `text <url>`_ -> text

def rst_to_prose(rst: str) -> list[str]:
  """The prose paragraphs of a reST file: directive bodies kept only when they are prose (a function's description,
  a note), literal blocks (`::`), code directives, tables, comments and headings' underlines dropped."""
  paras, cur, skip_indent = [], [], None
  def flush():
    if cur: paras.append(" ".join(cur))
    cur.clear()
  lines = rst.splitlines()
  for n, line in enumerate(lines):
    indent, s = len(line) - len(line.lstrip()), line.strip()
    if skip_indent is not None:                               # inside a skipped block: until it dedents
      if not s or indent > skip_indent: continue
      skip_indent = None
    if not s: flush(); continue
    if re.fullmatch(r"([=\-~^*#+\"'`.:_])\1{2,}", s) or s.startswith(("+-", "+=", "|", ">>>", "...")):
      flush(); continue                                       # heading underlines, tables, prompts
    if n + 1 < len(lines) and re.fullmatch(r"([=\-~^*#+\"])\1{2,}", lines[n + 1].strip()):
      flush(); continue                                       # a heading's text (short, not a sentence)
    if (m := re.match(r"\.\.\s+([\w:-]+)::", s)):             # a directive
      flush()
      if m[1].split(":")[-1] in SKIP_BODY: skip_indent = indent
      continue
    if s.startswith(".."):                                    # a comment or a target: its indented tail too
      flush(); skip_indent = indent; continue
    if re.match(r":[\w -]+:", s) and not ROLE.match(s):       # a directive's option, a field list entry
      flush(); continue
    literal = s.endswith("::")
    cur.append(s[:-1] if s.endswith("::") and not s.endswith(" ::") else s.removesuffix(" ::"))
    if literal: flush(); skip_indent = indent                 # the literal block after `::` is code
  flush()
  out = []
  for p in paras:
    p = ROLE.sub(lambda m: m[1].lstrip("~!").split(".")[-1] if m[0].count("~") else m[1].lstrip("!"), p)
    p = LINK.sub(r"\1", p)
    p = re.sub(r"``([^`]+)``", r"\1", p)
    p = re.sub(r"\*\*([^*]+)\*\*|\*([^*\s][^*]*)\*", lambda m: m[1] or m[2], p)
    p = re.sub(r"\s*\[(#\w*|\d+)\]_", "", p).replace("\\ ", "").replace("|", "")
    p = re.sub(r"^[*-] |^#\. |^\d+\. ", "", p)                # list bullets
    p = re.sub(r"\s+", " ", p).strip()
    letters = sum(c.isalpha() or c == " " for c in p)
    if len(p) >= 40 and letters >= 0.8 * len(p) and " " in p and p[0].isalnum(): out.append(p)
  return out

def docs_sources(docs_dir: Path | None) -> tuple[Path, str]:
  """The reST sources of the Python docs: an installed copy, or the Debian package unpacked to a temporary folder."""
  if docs_dir is not None: return docs_dir, f"{docs_dir} (given)"
  if DOCS_DIR.is_dir(): return DOCS_DIR, _dpkg_version(DOCS_PACKAGE) or "installed"
  tmp = Path(tempfile.mkdtemp(prefix="pydocs-"))
  try:
    subprocess.run(["apt-get", "download", DOCS_PACKAGE], cwd=tmp, check=True, capture_output=True)
    deb = next(tmp.glob("*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp / "root")], check=True)
  except (OSError, subprocess.CalledProcessError, StopIteration) as e:
    sys.exit(f"error: need the Python docs' reST sources: `apt-get download {DOCS_PACKAGE}` failed ({e}); "
             f"install that package or pass --docs DIR (a folder of *.rst.txt files)")
  return tmp / "root" / DOCS_DIR.relative_to("/"), deb.name

def _dpkg_version(pkg: str) -> str | None:
  try: return subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError): return None

def prose_documents(docs_dir: Path) -> list[tuple[str, str]]:
  """(name, text) for every reST file of the chosen parts, its paragraphs separated by blank lines."""
  files = sorted(f for part in DOCS_PARTS for f in ([docs_dir / part] if part.endswith(".txt") else (docs_dir / part).rglob("*.rst.txt")))
  docs = [(str(f.relative_to(docs_dir)), "\n\n".join(rst_to_prose(f.read_text(encoding="utf-8")))) for f in files]
  return [(n, t) for n, t in docs if len(t) > 200]


# ================================================= code =================================================

SKIP_CODE = ("test", "tests", "idlelib", "turtledemo", "lib2to3", "ensurepip", "site-packages", "pydoc_data",
             "encodings", "__phello__", "config-", "unittest", "tkinter")

def code_documents(stdlib: Path) -> list[tuple[str, str]]:
  """(name, source) for the standard library's .py files of 1-200 kB, left out: SKIP_CODE folders (tests, demos, IDLE,
  codec tables, ...)."""
  out = []
  for f in sorted(stdlib.rglob("*.py")):
    rel = f.relative_to(stdlib)
    if any(part.startswith(SKIP_CODE) for part in rel.parts[:-1]) or rel.name.startswith("test_"): continue
    if not 1000 <= f.stat().st_size <= 200_000: continue
    try: out.append((str(rel), f.read_text(encoding="utf-8")))
    except UnicodeDecodeError: continue
  return out


# ================================================= math =================================================

def arithmetic_line(rng: np.random.Generator) -> str:
  """One exact equation: a sum, a difference (never negative), a product, or a sum of three."""
  kind = rng.integers(4)
  if kind == 0:
    a, b = rng.integers(0, 1000, 2); return f"{a} + {b} = {a + b}"
  if kind == 1:
    a, b = sorted(rng.integers(0, 1000, 2), reverse=True); return f"{a} - {b} = {a - b}"
  if kind == 2:
    a, b = rng.integers(0, 100, 2); return f"{a} * {b} = {a * b}"
  a, b, c = rng.integers(0, 100, 3); return f"{a} + {b} + {c} = {a + b + c}"

def math_documents(n_docs: int, seed: int, lines: int = 16) -> list[tuple[str, str]]:
  rng = np.random.default_rng(seed)
  return [(f"math{i:06d}", "\n".join(arithmetic_line(rng) for _ in range(lines))) for i in range(n_docs)]


# ================================================ build ================================================

def split(docs: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
  """Every HOLD_OUT-th document (in the given sorted order) is validation, the rest training."""
  return ([t for i, (_, t) in enumerate(docs) if i % HOLD_OUT], [t for i, (_, t) in enumerate(docs) if not i % HOLD_OUT])

def sha256(path: Path) -> str: return hashlib.sha256(path.read_bytes()).hexdigest()

def build(out: Path, seed: int = 0, docs_dir: Path | None = None, math_docs: int = 8000) -> dict:
  """Write <domain>.{train,valid}.txt and manifest.json into `out`; return the manifest."""
  out.mkdir(parents=True, exist_ok=True)
  docs_dir, docs_version = docs_sources(docs_dir)
  stdlib = Path(sysconfig.get_paths()["stdlib"])
  domains = {"prose": prose_documents(docs_dir), "code": code_documents(stdlib), "math": math_documents(math_docs, seed)}
  manifest = {"python": sys.version.split()[0], "docs": docs_version, "seed": seed, "files": {}, "documents": {}}
  for name, docs in domains.items():
    train, valid = split(docs)
    manifest["documents"][name] = {"train": len(train), "valid": len(valid)}
    for part, texts in (("train", train), ("valid", valid)):
      path = out / f"{name}.{part}.txt"
      path.write_text(EOS.join(texts), encoding="utf-8")
      manifest["files"][path.name] = {"sha256": sha256(path), "bytes": path.stat().st_size}
  (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
  return manifest

def read_domain(folder: Path, domain: str, part: str) -> str:
  return (Path(folder) / f"{domain}.{part}.txt").read_text(encoding="utf-8")

def write_samples(folder: Path, out: Path, chars: int = 16_000) -> None:
  """demo/samples/<domain>.txt: the first whole documents of each validation split, about `chars` characters, for
  the figures and tests of a fresh clone (which has no demo/build). Same sources and licences as above."""
  out.mkdir(parents=True, exist_ok=True)
  for d in DOMAINS:
    docs, n = [], 0
    for doc in read_domain(folder, d, "valid").split(EOS):
      if n >= chars: break
      docs.append(doc); n += len(doc)
    (out / f"{d}.txt").write_text("\n\n".join(docs)[:chars * 2], encoding="utf-8")


# =============================================== tokenizer ===============================================

def train_tokenizer(texts: list[str], vocab_size: int, path: Path) -> Path:
  """Train a byte-level BPE on `texts` (one string per domain, each cut to the shortest's length so every domain
  gets an equal say) and save it as tokenizer.json. Ids 0 and 1 are `<|endoftext|>` and `<|padding|>`."""
  from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, decoders, trainers
  n = min(len(t) for t in texts)
  tok = Tokenizer(models.BPE())
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD], show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator((t[i:i + 10_000] for t in texts for i in range(0, n, 10_000)), trainer)
  path.parent.mkdir(parents=True, exist_ok=True)
  tok.save(str(path))
  return path


if __name__ == "__main__":
  ap = argparse.ArgumentParser(description="Build the demo's text domains (prose, code, math).")
  ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "build" / "data")
  ap.add_argument("--seed", type=int, default=0, help="seed of the generated arithmetic")
  ap.add_argument("--docs", type=Path, default=None, help="a folder of the Python docs' *.rst.txt sources")
  ap.add_argument("--samples", type=Path, default=None, help="also write held-out samples here (demo/samples)")
  a = ap.parse_args()
  m = build(a.out, a.seed, a.docs)
  for f, v in m["files"].items(): print(f"{f:22s} {v['bytes'] / 1e6:6.2f} MB  {v['sha256'][:16]}")
  print(json.dumps(m["documents"]))
  if a.samples: write_samples(a.out, a.samples)
