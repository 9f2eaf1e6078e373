"""The docs cannot drift from the code.

Every Python block the pages show (inline, or a docs/snippets/ file they include) runs here; the numbers the snippets
print, and a few the prose states, are checked against independent computations; every link into the source files
resolves to an existing symbol; and, when mkdocs is installed, the site builds with --strict and makes no request
outside itself. The snippet runs here also fill the cache the site build reads, so a build right after the tests
does not run them again."""
import importlib.util, math, os, re, shutil, subprocess, sys
from pathlib import Path
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
sys.path.insert(0, str(ROOT))

_spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
hooks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hooks)

PAGES = sorted(DOCS.glob("*.md"))
FENCE = re.compile(r"^(?P<indent>[ \t]*)```+ ?(?P<lang>\w+)[^\n]*\n(?P<body>.*?)^(?P=indent)```+[ \t]*$", re.M | re.S)
INCLUDE = re.compile(r'^\s*--8<-- "([^"]+)"\s*$')


def python_blocks() -> list[tuple[str, str, str]]:
  """(page, kind, what) for every ```python block: kind "file" (a --8<-- include of a snippet file) or "inline"."""
  out = []
  for page in PAGES:
    for m in FENCE.finditer(page.read_text(encoding="utf-8")):
      if m["lang"] != "python": continue
      lines = [l for l in m["body"].splitlines() if l.strip()]
      if len(lines) == 1 and (inc := INCLUDE.match(lines[0])): out.append((page.name, "file", inc[1]))
      else: out.append((page.name, "inline", "\n".join(l[len(m["indent"]):] for l in m["body"].splitlines())))
  return out

BLOCKS = python_blocks()
# the "Build it" solutions (docs/notebooks/) run as notebooks in tests/test_build_notebooks.py, which caches their output
SNIPPETS = sorted({what for _, kind, what in BLOCKS if kind == "file" and not what.startswith("notebooks/")})
_runs: dict[str, tuple[str, dict]] = {}

def run(snippet: str) -> tuple[str, dict]:
  """(printed text, globals) of a snippet, run once per test session; skipped while a file it needs is absent."""
  path = DOCS / snippet
  if missing := hooks.missing_requirements(path):
    pytest.skip(f"{snippet} runs on {missing[0]}, which is not in this checkout")
  if snippet not in _runs:
    _runs[snippet] = hooks.execute_snippet(path)
    hooks.store_output(path, _runs[snippet][0])        # the site build reuses it
  return _runs[snippet]

def page(name: str) -> str:
  """A page's text with the math delimiters \\( \\) dropped and whitespace runs made single spaces."""
  text = (DOCS / name).read_text(encoding="utf-8").replace("\\(", "").replace("\\)", "")
  return " ".join(text.split())

def softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


# ============================================ every block runs ============================================

@pytest.mark.parametrize("snippet", SNIPPETS)
def test_snippet_runs(snippet):
  out, _ = run(snippet)
  assert out.strip(), f"{snippet} printed nothing"

@pytest.mark.parametrize("code", [what for _, kind, what in BLOCKS if kind == "inline"] or [None])
def test_inline_python_block_runs(code, tmp_path):
  if code is None: pytest.skip("the pages have no inline Python blocks (all code is in docs/snippets/)")
  path = tmp_path / "block.py"
  path.write_text(code)
  hooks.execute_snippet(path)

def test_every_snippet_file_is_shown_and_every_marker_names_a_file():
  shown = set(SNIPPETS)
  for p in PAGES:
    for m in hooks.MARKER.finditer(p.read_text(encoding="utf-8")):
      if m[2] in ("output", "markdown"):
        assert (DOCS / m[3]).is_file(), f"{p.name}: {m[3]} does not exist"
        shown.add(m[3])
  files = {f"snippets/{f.name}" for f in (DOCS / "snippets").glob("*.py")}
  assert files <= shown, f"snippet files no page shows: {sorted(files - shown)}"


# ============================================ the numbers ============================================

def test_router_example_against_numpy():
  _, env = run("snippets/router_example.py")
  h, W = env["h"].numpy()[0], env["W_r"].numpy()
  z = W @ h
  p = softmax(z)
  top = np.argsort(-p, kind="stable")[:2]
  np.testing.assert_allclose(env["z"].numpy()[0], z, atol=1e-6)
  assert env["i"].numpy()[0].tolist() == top.tolist() == [0, 2]
  np.testing.assert_allclose(env["g"].numpy()[0], p[top], atol=1e-6)
  np.testing.assert_allclose(env["g_renorm"].numpy()[0], p[top] / p[top].sum(), atol=1e-6)
  # the hand computation written on the page
  text = page("router.md")
  assert "(1.5, 0.5, 1.0, -0.5)" in text
  assert f"9.455" in text and f"{np.exp(z).sum():.3f}" == "9.455"
  assert "p = (" + ", ".join(f"{x:.3f}" for x in p) + ")" in text
  assert f"g = ({p[0]:.3f}, {p[2]:.3f})" in text and f"summing to {p[top].sum():.3f}" in text
  assert f"{p[0] / p[top].sum():.3f}" in text and f"{p[2] / p[top].sum():.3f}" in text
  assert f"{1 - p[top].sum():.0%}" in text

def test_deepseek_example():
  _, env = run("snippets/deepseek_example.py")
  s = 1 / (1 + np.exp(-env["z"]))
  assert env["chosen"].tolist() == [1, 0]                       # the bias swapped expert 2 for expert 1
  np.testing.assert_allclose(env["g"], s[[1, 0]] / s[[1, 0]].sum())
  assert f"{s[0] / (s[0] + s[1]):.3f}" in page("router.md")

def test_parameter_counts_match_the_papers():
  _, env = run("snippets/param_counts.py")
  count = env["count"]
  olmoe_n, flex_n = count(env["OLMOE_1B_7B"]), count(env["FLEXOLMO_7X7B"])
  assert round(olmoe_n["total"] / 1e9, 1) == 6.9 and round(olmoe_n["active"] / 1e9, 1) == 1.3   # "OLMoE-1B-7B"
  assert round(flex_n["total"] / 1e9, 1) == 33.3 and flex_n["active"] == flex_n["total"]       # k = E as released
  assert round(count(env["FLEXOLMO_7X7B"], 4)["active"] / 1e9, 2) == 20.29
  assert f"{olmoe_n['experts'] / olmoe_n['total']:.0%} of its parameters are in the experts" in page("experts.md")
  out, _ = run("snippets/memory.py")
  gb = 2 * olmoe_n["total"] / 1e9
  assert f"| {gb:.1f} GB |" in out and f"about {gb:.0f} GB for its bf16 weights ({2 * gb:.0f} GB in fp32)" in \
    page("quickstart.md")
  _, sys_env = run("snippets/systems.py")
  assert (sys_env["total"], sys_env["active"]) == (olmoe_n["total"], olmoe_n["active"])

@pytest.mark.parametrize("overrides", [dict(), dict(num_key_value_heads=2, tie_word_embeddings=True)])
def test_parameter_count_is_what_the_models_allocate(overrides):
  import olmoe, flexolmo
  _, env = run("snippets/param_counts.py")
  c = dict(vocab_size=96, hidden_size=32, intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
           num_key_value_heads=4, num_experts=6, num_experts_per_tok=2, tie_word_embeddings=False) | overrides
  for cfg_cls, model_cls, model_type in ((olmoe.OlmoeConfig, olmoe.Olmoe, "olmoe"),
                                         (flexolmo.FlexOlmoConfig, flexolmo.FlexOlmo, "flex_olmo")):
    model = model_cls(cfg_cls.from_dict(c | {"model_type": model_type}))
    allocated = sum(math.prod(t.shape) for t in model.parameters().values())
    assert env["count"](c)["total"] == allocated, model_type

def test_one_expert_is_the_dense_ffn_and_copies_scale_it():
  _, env = run("snippets/experts.py")
  assert np.abs(env["one"].numpy() - env["dense"]).max() < 1e-4
  ratio = env["four"].numpy() / env["dense"]
  np.testing.assert_allclose(ratio, env["g4"].numpy().sum(-1)[None, :, None] * np.ones_like(ratio), rtol=1e-4)

def test_load_balancing_snippet():
  out, env = run("snippets/lb_loss.py")
  by_hand, E, k = env["by_hand"], env["E"], env["k"]
  assert by_hand(env["routings"]["balanced"], k)[2] == pytest.approx(k)            # uniform: k (normalised: 1)
  assert by_hand(env["routings"]["collapsed"], k)[2] == pytest.approx(E, abs=0.01)  # collapsed: E (normalised: E/k)
  assert by_hand(np.array([[0.04, 0.0]] * 3 + [[0.0, 9.0]]), 1)[2] < 1
  assert "E*sum(f*P) = 2.0000   olmoe: 2.0000" in out
  assert "E*sum(f*P) = 0.8825" in out and "(0.38, 0.62)" in page("load-balancing.md")
  for line in out.splitlines():
    if line.startswith("d LB / d z"):
      a, b = re.findall(r"\[([^\]]+)\]", line)
      np.testing.assert_allclose(np.array(a.split(), float), np.array(b.split(), float), atol=2e-3)
    if line.startswith("z-loss"):
      a, b = re.findall(r"(?:by hand|olmoe:) ([\d.]+)", line)
      assert float(a) == pytest.approx(float(b), rel=1e-4)

def _lb_numpy(logits: list[np.ndarray], k: int, pooled: bool) -> float:
  """The load-balancing loss in numpy: transformers' pooled form (f summing to k) or OLMoE's per-layer mean."""
  E = logits[0].shape[1]
  p = [softmax(z.astype(np.float64)) for z in logits]
  f = [np.bincount(np.argsort(-q, -1, kind="stable")[:, :k].ravel(), minlength=E) / len(q) for q in p]
  if pooled: return E * (np.mean(f, 0) * np.mean([q.mean(0) for q in p], 0)).sum()
  return float(np.mean([E * (fl / k * q.mean(0)).sum() for fl, q in zip(f, p)]))

def test_lb_conventions_snippet():
  out, env = run("snippets/lb_conventions.py")
  E, k, halves = env["E"], env["k"], env["halves"]
  pooled, per_layer = _lb_numpy(halves, k, True), _lb_numpy(halves, k, False)
  assert pooled == pytest.approx(k, abs=1e-6) and 1.8 < per_layer < 2.0           # "about twice the balanced value"
  assert f"transformers  LB = {pooled:.4f}" in out and f"olmoe         LB = {per_layer:.4f}" in out
  grads = dict(re.findall(r"(transformers|olmoe) .*\|d LB / d z\| = ([\d.e+-]+)", out))
  assert float(grads["transformers"]) < 1e-6 < 1e-4 < float(grads["olmoe"])       # no pull pooled, a pull per layer
  # alpha: one layer, exactly k times; three layers of random logits, not
  assert _lb_numpy(env["one"], k, True) == pytest.approx(k * _lb_numpy(env["one"], k, False), rel=1e-9)
  assert f"= k x olmoe {k * _lb_numpy(env['one'], k, False):.4f}" in out
  ratio = _lb_numpy(env["three"], k, True) / _lb_numpy(env["three"], k, False)
  assert abs(ratio - k) > 0.1 and f"ratio {ratio:.4f};" in out
  assert float(re.search(r"max \|0.01/k grad_t - 0.01 grad_o\| = ([\d.e+-]+)", out)[1]) < 1e-9   # "to the last bit"
  assert float(re.search(r"cosine ([\d.-]+)", out)[1]) < 0.9                    # "cosine well below 1"
  assert "0.01}{8} = 0.00125" in page("load-balancing.md") and 0.01 / 8 == 0.00125

def test_lb_batches_snippet():
  out, env = run("snippets/lb_batches.py")
  E, logits, seqs = env["E"], env["logits"], env["seqs"]
  lb = lambda names: _lb_numpy([np.concatenate([logits[s] for s in names])], 1, False)
  want = [lb(seqs), np.mean([lb(seqs[:2]), lb(seqs[2:])]), np.mean([lb([s]) for s in seqs])]
  np.testing.assert_allclose(list(env["levels"].values()), want, rtol=1e-5)
  assert want[0] == pytest.approx(1) and want[0] < want[1] < want[2]              # global < micro-batch < sequence

def test_bias_balancing_snippet():
  out, env = run("snippets/bias_balancing.py")
  # the last routing chose the top-k of p + b (the bias before its last update), by numpy
  p, i, b = env["p"], env["i"], env["b_before"]
  top = np.argsort(-(p + b), -1, kind="stable")[:, :env["k"]]
  assert (np.sort(top, 1) == np.sort(i, 1)).all()
  rows = [l.split() for l in out.splitlines() if re.match(r"\s*\d+\s+\d\.\d\d ", l)]
  first, last = max(map(float, rows[0][1:9])), max(map(float, rows[-1][1:9]))
  assert first > 2.5 and last - 1 < (first - 1) / 3                                 # "much closer to uniform"
  assert "True" in out and int(re.search(r"differs from the chosen: (\d+) of 64", out)[1]) > 32   # "most tokens"

def test_capacity_snippet():
  out, env = run("snippets/capacity.py")
  keep, i, E = env["keep_within_capacity"], env["i"], env["E"]
  load = np.bincount(i.ravel(), minlength=E)
  assert f"Expert 0 is popular ({load[0]} of {i.size} assignments against an even share of {i.size // E})" in \
    page("capacity.md")
  drops = [(~keep(i, E, math.ceil(cf * i.size / E))).sum() for cf in (0.5, 1.0, 1.25, 2.0, E / 2)]
  assert drops == sorted(drops, reverse=True) and drops[-1] == 0
  assert (~keep(i, E, load.max())).sum() == 0 and (~keep(i, E, load.max() - 1)).sum() > 0
  alone, in_batch = env["alone"], env["in_batch"]
  assert alone.all() and not in_batch.all()                       # the page's "depends on the batch" example

def test_rope_scores_depend_on_the_offset_only():
  _, env = run("snippets/attention.py")
  rotate, q, k = env["rotate"], env["q"], env["k"]
  scores = [rotate(q, m) @ rotate(k, n) for m, n in [(5, 2), (13, 10), (3, 0)]]
  assert max(scores) - min(scores) < 1e-4
  assert env["diff"] < 1e-5
  np.testing.assert_allclose(env["rms"](env["per_head"]), 1.0, atol=1e-3)
  full = env["rms"](env["full"])
  assert full[1] / full[0] > 5                                     # the full-width norm keeps the heads' ratio

def test_masking_equals_deleting():
  _, env = run("snippets/optout.py")
  np.testing.assert_array_equal(env["g_mask"].numpy(), env["g_del"].numpy())
  assert (env["i_mask"].numpy() != env["out"]).all()
  assert env["takes"].any()                                         # zeroing instead leaves it in the top-k

def test_kept_experts_and_attribution_snippet():
  """The snippet's kept model has the full model's parameters minus one expert FFN and one router row per layer
  (counted by hand), the masked full model's logits, and shares that a plain loop over its routing gives."""
  out, env = run("snippets/flexolmo_kept.py")
  kept, cfg = env["kept"], env["full"].cfg
  assert kept.cfg.names() == ["public", "math"]
  D, I, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
  assert env["size"](env["full"]) - env["size"](kept) == L * (3 * D * I + D)
  assert "max |logits kept - logits masked| = 0.0" in out
  acc, n = dict.fromkeys(kept.cfg.names(), 0.0), 0
  for step in env["steps"]:
    for l in range(L):
      w = step.weights[l, 0] / step.weights[l, 0].sum()
      for e, x in zip(step.experts[l, 0], w): acc[kept.cfg.names()[e]] += x
      n += 1
    if step.tokens[0] in kept.cfg.eos_ids: break
  assert env["shares"] == pytest.approx({k: v / n for k, v in acc.items()})
  printed = dict((k, int(v)) for k, v in re.findall(r"(\w+) (\d+)%", out.splitlines()[-1]))
  assert sum(printed.values()) == 100 and all(abs(printed[k] - 100 * v / n) < 1 for k, v in acc.items())

def test_analysis_definitions_by_hand():
  _, env = run("snippets/analyses_toy.py")
  np.testing.assert_allclose(env["load"], [4 / 6, 3 / 6, 3 / 6, 2 / 6])
  np.testing.assert_allclose(env["coact"][0], [0, 3 / 4, 1 / 4, 0])
  assert env["coact"][1, 0] == 1 and env["coact"][0, 1] == 0.75   # asymmetric
  np.testing.assert_allclose(env["spec"]["code"], [1, 2 / 3, 1 / 3, 0])
  np.testing.assert_allclose(env["vocab"][env["ids"].tolist().index(7)], [1, 2 / 3, 1 / 3, 0])
  assert env["saturation"] == pytest.approx(5 / 6)

def test_systems_numbers_on_the_pages():
  _, env = run("snippets/systems.py")
  assert f"{env['read'] / 1e9:.2f} GB read per token" in page("systems.md")
  assert f"reads {env['read'] / 1e9:.1f} GB, because" in page("systems.md")
  per_token = lambda B: env["step_bytes"](B)[1] / B
  assert f"fall by {per_token(1) / per_token(16):.1f}× for OLMoE" in page("systems.md")
  assert f"about {round(env['bandwidth'] / env['read'], -2):.0f} tokens/s" in page("systems.md")
  assert f"{(7 / 8) ** 100:.1e}".startswith("1.6") and "1.6 \\times 10^{-6}" in page("systems.md")
  kv = env["kv"]
  assert f"{kv / 1e3:.0f} kB per token" in page("quickstart.md")

def test_exercise_solutions_state_their_measurements():
  out, env = run("snippets/ex_norm_topk.py")
  lo, hi = 1 / env["mass"][0].max(), 1 / env["mass"][0].min()      # the first layer's factors
  assert f"between about {lo:.1f} and {hi:.1f} here" in page("exercises.md")
  assert 0.1 < 1 - env["same"] < 0.6                                 # "a sizeable share of the positions"


# ============================================ code links ============================================

def test_code_links_resolve_to_their_symbols():
  anchors: dict[str, set] = {}
  for p in PAGES:
    hooks.rewrite_code_links(p.read_text(encoding="utf-8"), p.name, anchors)   # raises KeyError on a bad symbol
  assert anchors["olmoe"] and anchors["flexolmo"]
  a, b = hooks.symbol_lines("olmoe.py", "route")
  lines = (ROOT / "olmoe.py").read_text().splitlines()
  assert lines[a - 1].startswith("def route(") and "return z, g.cast(z.dtype), i" in lines[b - 1]
  a, _ = hooks.symbol_lines("olmoe.py", "SparseMoeBlock.__call__")
  assert lines[a - 1].strip().startswith("def __call__")
  a, b = hooks.symbol_lines("olmoe.py", "losses")
  assert "losses" in lines[a - 1] and a < b

def test_a_link_to_a_missing_symbol_fails():
  with pytest.raises(KeyError):
    hooks.rewrite_code_links("see [x](olmoe.py#no_such_function)", "router.md")
  assert "source/olmoe.md#L" in hooks.rewrite_code_links("[r](olmoe.py#route)", "router.md")
  assert hooks.rewrite_code_links("[r](olmoe.py#route)", "sub/page.md").startswith("[r](../source/")


# ============================================ the site ============================================

def test_site_builds_strict_and_offline(tmp_path):
  """Build the site (the snippet outputs are cached by the tests above) and check that no page loads anything from
  another host, that the math and the snippet outputs are there, and that KaTeX is vendored."""
  if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
    pytest.skip("mkdocs-material is not installed (pip install -e '.[docs]'); .ci/run builds the site separately")
  site = tmp_path / "site"
  env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
  r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                     capture_output=True, text=True, env=env, timeout=900)
  assert r.returncode == 0, r.stderr[-4000:]
  remote = re.compile(r"<(?:script|link|img|iframe|source)\b[^>]*\b(?:src|href)=[\"'](?:https?:)?//", re.I)
  for html in site.rglob("*.html"):
    assert not remote.search(html.read_text(encoding="utf-8")), f"{html.relative_to(site)} loads a remote resource"
  css = (site / "assets" / "katex" / "katex.min.css").read_text()
  assert "@import" not in css and "//" not in re.sub(r"/\*.*?\*/", "", css).replace("url(fonts/", "")
  for font in re.findall(r"url\((fonts/[^)]+\.woff2)\)", css): assert (site / "assets" / "katex" / font).exists()
  router = (site / "router" / "index.html").read_text(encoding="utf-8")
  assert 'class="arithmatex"' in router and "OLMoE g = p_i" in router
  assert 'href="../source/olmoe/#L' in router
  assert (site / "source" / "olmoe" / "index.html").exists() and (site / "api" / "index.html").exists()
  assert "load_balancing_loss" in (site / "api" / "index.html").read_text(encoding="utf-8")


# ===================================== design choices, opt-out guarantees, serving =====================================

def _comb(n: int, r: int) -> int:
  """n choose r by the multiplicative formula in exact integers (independent of math.comb, which the snippets use)."""
  out = 1
  for i in range(r): out = out * (n - i) // (i + 1)
  return out

def test_design_parameters_from_the_model_equal_the_hand_count():
  """design_params.py counts OLMoE-1B-7B from the model olmoe.py builds; the oracle is the count from the config's
  shapes by hand (the spec's 6.919B total, 1.282B active), and the page's ratios follow from it."""
  out, env = run("snippets/design_params.py")
  V, D, I, L, E, k = 50304, 2048, 1024, 16, 64, 8
  shared = 2 * V * D + D + L * (4 * D * D + 4 * D + E * D)   # embedding + LM head, final norm; attention, norms, router
  assert env["total"] == shared + L * E * 3 * D * I == 6_919_161_856
  assert env["active"] == shared + L * k * 3 * D * I == 1_282_017_280
  assert f"forward {2 * (env['active'] - V * D) / 1e9:.2f} GFLOP per token" in out
  text = page("design.md")
  assert f"A dense model with {env['active'] / 1e9:.1f}B parameters" in text
  assert f"holds {env['total'] / env['active']:.1f} times fewer weights" in text
  assert f"for OLMoE-1B-7B, {env['total'] / 1e9:.1f}B with their gradients" in text
  import olmoe, flexolmo, inspect
  cfg = olmoe.OlmoeConfig()
  assert (cfg.router_aux_loss_coef, cfg.router_z_loss_coef) == (0.01, 0.001)   # the page's alpha and beta
  assert inspect.signature(flexolmo.train_expert).parameters["z_loss"].default == 0.001
  assert "alpha = 0.01" in text and "beta = 0.001" in text and "weight 0.001" in text

def test_design_granularity_table():
  out, env = run("snippets/design_granularity.py")
  assert env["rows"] == {E: _comb(E, 8 * 1024 // (64 * 1024 // E)) for E in (8, 16, 32, 64, 128)}
  assert env["rows"][64] == 4_426_165_368 and env["shared"] == _comb(63, 7)
  assert env["rows"][64] == 8 * env["shared"]                   # C(64, 8) / C(63, 7) = 64 / 8
  text = page("design.md")
  assert f"about {env['rows'][64] / 1e9:.1f} billion combinations" in text
  assert "exactly 64/8 = 8 times fewer expert sets" in text
  assert f"about {29.4 / 24.4 - 1:.1f}" == "about 0.2" and "about a fifth more" in text   # the paper's 29.4k vs 24.4k
  # "Exercise 2 ... runs the comparison on 768 tokens": three samples of 256 tokens
  assert 'DOMAINS, T = ("prose", "code", "math"), 256' in (DOCS / "notebooks" / "expert_choice.py").read_text()
  assert "on 768 tokens" in text

def test_design_routing_token_choice_and_expert_choice():
  """The demo's token choice is numpy's top-k of the router softmax; expert choice fills every expert with exactly C
  tokens and leaves some tokens with none; only expert choice changes when the text is cut (the model was run on
  the first half by the snippet itself)."""
  out, env = run("snippets/design_routing.py")
  p, tc, ec, C, k = env["p"], env["tc"], env["ec"], env["C"], env["k"]
  np.testing.assert_array_equal(np.argsort(-p, -1, kind="stable")[:, :k], tc)
  assert (ec.sum(0) == C).all() and ec.sum() == tc.size
  assert (ec.sum(1) == 0).any() and len(set(ec.sum(1).tolist())) > 1
  assert env["tc_changed"] == 0 and env["ec_changed"] > 0
  assert f"of {env['ec_changed']} under expert choice, of 0 under token choice" in out

def test_optout_guarantee_on_the_demo():
  """The opted-out model equals the model loaded without the expert bit for bit, never chooses it, and is unchanged
  by NaN in its weights, while the same NaN reaches the logits once the expert is back in; the smaller model's router
  is the full router without row j (checked against the weights)."""
  out, env = run("snippets/optout_guarantee.py")
  j, full, without = env["j"], env["full"], env["without"]
  np.testing.assert_array_equal(env["masked"], env["reference"])
  assert not (env["chosen"] == j).any()
  np.testing.assert_array_equal(env["poisoned"], env["masked"])
  assert not np.isfinite(env["back_in"]).all()
  for a, b in zip(full.layers, without.layers):                 # rows other than j were not poisoned
    np.testing.assert_array_equal(np.delete(a.mlp.gate.float().numpy(), j, 0), b.mlp.gate.float().numpy())
  assert full.cfg.num_experts == full.cfg.num_experts_per_tok == 3
  assert "k = E = 3" in page("flexolmo-guarantees.md")
  _, counts = run("snippets/param_counts.py")                   # the paper's 8 experts, 4 active
  n = counts["count"](counts["FLEXOLMO_7X7B"] | {"num_experts": 8}, 4)
  assert f"{n['total'] / 1e9:.1f}B and {n['active'] / 1e9:.1f}B by the count" in page("flexolmo-guarantees.md")

def test_serving_all_to_all_against_a_second_formula():
  """Expected remote devices from the hypergeometric product (no binomials), the page's 1 MB and 2.4 GB, and the
  naive traffic equal to the systems snippet's."""
  out, env = run("snippets/serving_alltoall.py")
  E, k, L, D = 64, 8, 16, 2048
  for G, moved in env["moved"].items():
    miss = math.prod((E - E // G - i) / (E - i) for i in range(k))
    assert moved == pytest.approx(2 * (G - 1) * (1 - miss) * D * 2)
  _, sys_env = run("snippets/systems.py")
  assert L * env["naive"] == sys_env["a2a"]
  text = page("serving.md")
  assert f"About {L * env['moved'][64] / 1e6:.0f} MB per token" in text
  assert f"the {sys_env['read'] / 1e9:.1f} GB of weights a token reads" in text
  _, design = run("snippets/design_params.py")
  assert f"The experts hold {design['experts'] / design['total']:.0%} of OLMoE's parameters" in text
  assert f"{E // k} for OLMoE" in text

def test_serving_expert_bytes_by_hand():
  out, env = run("snippets/serving_expert_bytes.py")
  assert env["bf16"] == 2 * 3 * 2048 * 1024 and env["int8"] == 3 * 2048 * 1024 + 4 * (2 * 1024 + 2048)
  assert "12.6 MB in bf16" in out and "12.9 GB in bf16" in out

def test_serving_offload_statistics_recomputed():
  """What the snippet prints about the demo's generation, recomputed from its routing with other code: an LRU cache
  from OrderedDict, the reuse and distinct counts, and the page's comparisons with uniform routing."""
  from collections import OrderedDict
  out, env = run("snippets/serving_offload.py")
  ids, L, E, k = env["ids"], env["L"], env["E"], env["k"]
  assert (L, E, k) == (4, 16, 2) and "(\\(E = 16\\), \\(k = 2\\), 4 layers)" in (DOCS / "serving.md").read_text()
  assert all(len(set(ids[t, l].tolist())) == k for t in range(len(ids)) for l in range(L))
  def hits(seq, size):
    cache, n = OrderedDict(), 0
    for chosen in seq:
      for e in chosen.tolist():
        n += e in cache
        cache[e] = None; cache.move_to_end(e)
        if len(cache) > size: cache.popitem(last=False)
    return n / (len(seq) * k)
  for size in (2, 4, 8):
    share = np.mean([hits(ids[:, l], size) for l in range(L)])
    assert f"of {size} experts per layer serves {share:.0%}" in out
  shared = np.mean([len(np.intersect1d(ids[t, l], ids[t - 1, l])) for t in range(1, len(ids)) for l in range(L)])
  assert env["again"] == pytest.approx(shared) and shared > k * k / E          # "far more often than uniform"
  assert env["touched"] < E * (1 - (1 - k / E) ** env["B"])                    # "a little fewer than uniform"
  assert min(env["busiest"]) > 1

def test_systems_batching_numbers():
  text = page("systems.md")
  touched = lambda B: 64 * (1 - (1 - 8 / 64) ** B)
  assert f"{touched(4):.1f} of 64 at B = 4, {touched(16):.0f} at B = 16" in text
  assert touched(32) > 63 and "nearly all of them from B = 32 on" in text

def test_bench_readme_decode_section_agrees_with_its_tables():
  """The prose section on the decode step quotes figures that the tables of the same file record."""
  bench = (ROOT / "bench" / "README.md").read_text(encoding="utf-8")
  section = bench[bench.index("## What decides the speed of a decode step on this CPU"):bench.index("## What each optimisation gives")]
  tables, section = " ".join(bench.replace(section, "").split()), " ".join(section.split())
  for quoted, recorded in [("from 8.7 to 5.2 ms", "demo 8.7 -> 5.2 ms"), ("from 45.8 to 35.0 ms", "small-bf16 45.8 -> 35.0 ms"),
                           ("from 8.9 to 1.6 s", "8.9 -> 1.6 s"), ("598 kernel calls per decode step instead of 310", "598 -> 310"),
                           ("306 kernels per decode step instead of 254", "306 -> 254"), ("6.2 ms with them, 2.0 ms without", "6.2 -> 2.0 ms"),
                           ("from 5.5-6.4 s to 1.7-2.6 s", "from 5.5-6.4 s to\n1.7-2.6 s"), ("81 -> 62 ms per token", "decode 81 -> 62 ms"),
                           ("small-bf16 72 -> 61 ms", "decode 72 -> 61 ms"), ("9.2 -> 2.4 s", "9.2 -> 2.4 s"),
                           ("3.4 ms\n  per token in a fresh process", "at 3.4 ms per token"), ("1.55 s", "1.55 -> 0.46 s"),
                           ("44 to 26 ms", "fp32 44 -> 26 ms"), ("35 to 18 ms", "bf16 35 -> 18 ms")]:
    assert " ".join(quoted.split()) in section, quoted
    assert " ".join(recorded.split()) in tables, recorded

def test_quickstart_times_are_the_bench_table():
  """The quickstart's whole-command times of the demo model are the warm and cold rows of bench/README.md."""
  bench = (ROOT / "bench" / "README.md").read_text(encoding="utf-8")
  warm = float(re.search(r"^\| warm \| ([\d.]+) \|", bench, re.M).group(1))
  cold = float(re.search(r"^\| cold \(a new, empty cache folder\) \| ([\d.]+) \|", bench, re.M).group(1))
  text = " ".join(page("quickstart.md").split())
  assert f"takes about {warm:.1f} s, against about {cold:.1f} s for the very first run" in text
