"""flexolmo.py against transformers' FlexOlmoForCausalLM (fp32, eager) on tiny random checkpoints it wrote, plus the
opt-out, merge and coordinated-training recipe checked against their definitions.

Kernels are built with tinygrad's NOOPT=1 (no upcasting or unrolling): lowering a kernel is then about three times
faster on CPU, and the tiny models here do not need the speed. The code under test is the same."""
import hashlib, json, os, re, shutil, subprocess, sys
from pathlib import Path
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from tinygrad import Tensor
from tinygrad.helpers import Context
from conftest import ROOT, TEXTS, save_hf_olmoe, hf_reference, make_tokenizer_json
import flexolmo

CONFIGS = {
  "gqa": dict(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2),
  "topk_below_E": dict(num_experts=6, num_experts_per_tok=3),
  "topk_equals_E": dict(num_experts=3, num_experts_per_tok=3, num_key_value_heads=1),
}
SMALL = dict(hidden_size=32, intermediate_size=16, num_attention_heads=2, num_key_value_heads=2)   # the recipe's models

@pytest.fixture(autouse=True, scope="module")
def no_kernel_optimiser():
  with Context(NOOPT=1): yield

def save_flex(path, seed=0, **kw): return save_hf_olmoe(path, seed=seed, model_type="flex_olmo", **kw)

def save_olmo2(path: Path, seed: int = 0, **overrides) -> Path:
  """A random dense Olmo2ForCausalLM (a FlexOlmo public model before upcycling), norms perturbed away from 1."""
  from transformers import Olmo2Config, Olmo2ForCausalLM
  kw = dict(vocab_size=320, num_hidden_layers=2, max_position_embeddings=128, eos_token_id=0, pad_token_id=1, **SMALL)
  torch.manual_seed(seed)
  model = Olmo2ForCausalLM(Olmo2Config(**{**kw, **overrides})).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name: p.add_(torch.randn_like(p) * 0.2)
      else: p.mul_(3.0)
  path.mkdir(parents=True)
  model.save_pretrained(path)
  make_tokenizer_json(path)
  return path

def ids_for(seed, B=2, T=12): return torch.randint(2, 320, (B, T), generator=torch.Generator().manual_seed(seed))

def max_diff(model, path, ids) -> float:
  with torch.no_grad(): theirs = hf_reference(path)(ids).logits.numpy()
  return float(np.abs(model(Tensor(ids.numpy())).numpy() - theirs).max())


# ------------------------------------------------- inference -------------------------------------------------

@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name, tmp_path):
  path = save_flex(tmp_path, seed=len(name), **CONFIGS[name])
  model, _ = flexolmo.load(str(path), progress=False)
  ids = ids_for(1)
  with torch.no_grad(): out = hf_reference(path)(ids, output_router_logits=True)
  logits, routing = model(Tensor(ids.numpy()), return_routing=True)
  assert np.abs(logits.numpy() - out.logits.numpy()).max() <= 1e-4
  assert max(np.abs(a.numpy() - b.numpy()).max() for a, b in zip(routing.logits, out.router_logits)) <= 1e-5


def test_greedy_generation_matches_transformers(tmp_path):
  path = save_flex(tmp_path, seed=3, **CONFIGS["gqa"])
  model, _ = flexolmo.load(str(path), progress=False)
  prompt = [9, 55, 201, 7, 300, 12]
  with torch.no_grad():
    theirs = hf_reference(path).generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                                         eos_token_id=None, pad_token_id=1)[0, len(prompt):].tolist()
  assert [s.tokens[0] for s in flexolmo.olmoe.generate(model, [prompt], 20, stop_ids=())] == theirs


def delete_experts(src: Path, dst: Path, gone: list[int]) -> Path:
  """The checkpoint with experts `gone` removed: their FFNs deleted (the rest renumbered) and router rows sliced."""
  sd, cfg = load_file(str(src / "model.safetensors")), json.loads((src / "config.json").read_text())
  keep = [e for e in range(cfg["num_experts"]) if e not in gone]
  out = {}
  for k, v in sd.items():
    m = re.fullmatch(r"(.*\.mlp\.experts)\.(\d+)\.(.*)", k)
    if m and int(m[2]) in keep: out[f"{m[1]}.{keep.index(int(m[2]))}.{m[3]}"] = v
    elif k.endswith("mlp.gate.weight"): out[k] = v[keep]
    elif not m: out[k] = v
  dst.mkdir()
  save_file(out, str(dst / "model.safetensors"))
  cfg.update(num_experts=len(keep), num_experts_per_tok=min(cfg["num_experts_per_tok"], len(keep)))
  (dst / "config.json").write_text(json.dumps(cfg))
  return dst


@pytest.mark.parametrize("gone", [[2], [0, 4], [1, 3, 5]])
def test_opting_out_equals_deleting_the_experts(gone, tmp_path):
  """Both ways of opting out, loading only the kept experts (`load`) and masking them in the full model
  (`select_experts`), against transformers on a checkpoint with the experts physically deleted."""
  path = save_flex(tmp_path / "full", seed=5, **CONFIGS["topk_below_E"])
  cut, ids = delete_experts(path, tmp_path / "cut", gone), ids_for(2)
  kept, _ = flexolmo.load(str(path), opt_out=[str(e) for e in gone], progress=False)
  masked, _ = flexolmo.load(str(path), progress=False)
  masked.select_experts(opt_out=gone)
  for model in (kept, masked):
    assert model.top_k == min(3, 6 - len(gone))                                  # k capped at the enabled experts
    assert max_diff(model, cut, ids) <= 1e-4
    _, routing = model(Tensor(ids.numpy()), return_routing=True)
    rows = np.array([int(n) for n in model.cfg.names()])                         # router row -> original expert
    assert not np.isin(rows[np.concatenate([i.numpy() for i in routing.experts])], gone).any()   # never routed to
  assert kept.cfg.names() == [str(e) for e in range(6) if e not in gone] and kept.cfg.num_experts == 6 - len(gone)


def fuse_experts(src: Path, dst: Path) -> Path:
  """The checkpoint with each layer's experts stored fused, as transformers 5 holds them: gate_up_proj (E, 2I, D)
  and down_proj (E, D, I)."""
  sd, cfg = load_file(str(src / "model.safetensors")), json.loads((src / "config.json").read_text())
  out = {k: v for k, v in sd.items() if ".experts." not in k}
  for l in range(cfg["num_hidden_layers"]):
    w = lambda e, p: sd[f"model.layers.{l}.mlp.experts.{e}.{p}.weight"]
    out[f"model.layers.{l}.mlp.experts.gate_up_proj"] = np.stack([np.concatenate([w(e, "gate_proj"), w(e, "up_proj")])
                                                                   for e in range(cfg["num_experts"])])
    out[f"model.layers.{l}.mlp.experts.down_proj"] = np.stack([w(e, "down_proj") for e in range(cfg["num_experts"])])
  shutil.copytree(src, dst)
  save_file(out, str(dst / "model.safetensors"))
  return dst


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_loading_only_the_kept_experts_equals_masking(layout, tmp_path, monkeypatch):
  """`load(experts=...)` gives bit for bit the logits and routing of the full model with the other experts masked,
  keeps the original names, and reads from the files exactly the bytes of the shared tensors, of the kept experts
  and of their router rows (the byte count from the safetensors header, by hand)."""
  import olmoe_checkpoint
  path = save_flex(tmp_path / "full", seed=12, num_experts=5, num_experts_per_tok=3)
  cfg = json.loads((path / "config.json").read_text())
  names = ["public", "math", "news", "code", "poetry"]
  (path / "config.json").write_text(json.dumps({**cfg, "expert_names": names}))
  if layout == "fused": path = fuse_experts(path, tmp_path / "fused")
  full, _ = flexolmo.load(str(path), progress=False)
  read = []
  def counting(path, offset):
    inner = reader(path, offset)
    return lambda out: read.append(out.nbytes) or inner(out)
  reader = olmoe_checkpoint._file_reader
  monkeypatch.setattr(olmoe_checkpoint, "_file_reader", counting)
  blob = (path / "model.safetensors").read_bytes()
  header = json.loads(blob[8:8 + int.from_bytes(blob[:8], "little")])         # the safetensors layout, read by hand
  size = lambda k: (lambda o: o[1] - o[0])(header[k]["data_offsets"])
  ids = Tensor(ids_for(7).numpy())
  for experts, opt_out, keep in [([0, "code"], None, [0, 3]), (["4", "news", 1], None, [1, 2, 4]), (None, ["math"], [0, 2, 3, 4]),
                                 ("poetry", None, [4])]:
    read.clear()
    model, _ = flexolmo.load(str(path), experts, opt_out, progress=False)
    per_expert = sum(size(k) for k in header if ".experts.0." in k or k.endswith("experts.gate_up_proj")
                     or k.endswith("experts.down_proj")) // (1 if layout == "per_expert" else 5)
    gates = [k for k in header if k.endswith("mlp.gate.weight")]
    shared = sum(size(k) for k in header if ".experts." not in k and k not in gates and k != "__metadata__")
    assert sum(read) == shared + len(keep) * per_expert + sum(size(k) for k in gates) * len(keep) // 5
    assert model.cfg.names() == [names[e] for e in keep] and model.cfg.num_experts == len(keep)
    assert full.select_experts(experts, opt_out) == model.cfg.names() and model.top_k == full.top_k == min(3, len(keep))
    (a, ra), (b, rb) = full(ids, return_routing=True), model(ids, return_routing=True)
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    for ga, ia, gb, ib in zip(ra.weights, ra.experts, rb.weights, rb.experts):
      np.testing.assert_array_equal(ga.numpy(), gb.numpy())
      np.testing.assert_array_equal(ia.numpy(), np.array(keep)[ib.numpy()])    # the same experts, renumbered
  with pytest.raises(flexolmo.OlmoeError, match=r"unknown experts 'poetry!', 5 \(this model has: public, math"):
    flexolmo.load(str(path), experts=["poetry!", 5, "math"], progress=False)
  with pytest.raises(flexolmo.OlmoeError, match="unknown expert -1"): flexolmo.load(str(path), opt_out=[-1], progress=False)


def test_attribution_by_hand():
  """Two layers, k = 2, a batch of two where the second prompt stops at its first token: the shares worked out by
  hand from the renormalised weights."""
  Step = flexolmo.Step
  steps = [Step([7, 0], weights=np.array([[[.6, .2], [.5, .5]], [[.3, .3], [.9, .1]]]),
                experts=np.array([[[0, 1], [2, 0]], [[1, 2], [0, 1]]])),
           Step([8, 1], weights=np.array([[[.4, .4], [.7, .3]], [[.2, .6], [.7, .3]]]),   # row 1 stopped: padding
                experts=np.array([[[2, 0], [1, 2]], [[0, 1], [1, 2]]]))]
  # row 0: step 0 gives e0 .75, e1 .25 (layer 0) and e1 .5, e2 .5 (layer 1); step 1 gives e2 .5, e0 .5 and e0 .25,
  # e1 .75; over L T = 4: e0 1.5/4, e1 1.5/4, e2 1/4. Row 1, its stop token only: e2 .5, e0 .5, e0 .9, e1 .1 over 2.
  shares = flexolmo.attribution(steps, ["public", "math", "code"], stop_ids=[0])
  assert shares[0] == pytest.approx({"public": .375, "math": .375, "code": .25})
  assert shares[1] == pytest.approx({"public": .7, "math": .05, "code": .25})
  assert flexolmo.format_shares(shares[1]) == "public 70%, code 25%, math 5%"
  assert flexolmo.format_shares({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}) == "a 34%, b 33%, c 33%"    # sums to 100
  with pytest.raises(flexolmo.OlmoeError, match="with_routing=True"): flexolmo.attribution([Step([1])], ["a"])


def test_attribution_of_a_generation_against_numpy(tmp_path):
  """The shares of a batch generated by a model holding 3 of 5 experts (named by their original names), against a
  plain numpy loop over the routing weights that generate yielded, the rows stopping at their own EOS."""
  path = save_flex(tmp_path, seed=13, num_experts=5, num_experts_per_tok=2)
  model, _ = flexolmo.load(str(path), experts=[4, 1, 2], progress=False)
  steps = list(flexolmo.olmoe.generate(model, [[9, 55, 201], [7, 300, 12, 40, 41]], 12, stop_ids=(), with_routing=True))
  stop = steps[4].tokens[1]                                                      # the second row stops by step 4
  got = flexolmo.attribution(steps, model.cfg.names(), stop_ids=[stop])
  assert [list(g) for g in got] == [["1", "2", "4"]] * 2
  for b in range(2):
    acc, n = np.zeros(5), 0
    for step in steps:
      for l in range(step.weights.shape[0]):
        w = step.weights[l, b].astype(np.float64)
        for e, x in zip(step.experts[l, b], w / w.sum()): acc[[1, 2, 4][e]] += x
        n += 1
      if step.tokens[b] == stop: break
    assert b == 0 or n <= 5 * 2
    np.testing.assert_allclose([got[b][str(e)] for e in (1, 2, 4)], acc[[1, 2, 4]] / n, rtol=1e-6)
    assert sum(got[b].values()) == pytest.approx(1)


def test_expert_names_select_experts(tmp_path):
  path = save_flex(tmp_path, seed=6, num_experts=3, num_experts_per_tok=2)
  cfg = json.loads((path / "config.json").read_text())
  (path / "config.json").write_text(json.dumps({**cfg, "expert_names": ["public", "math", "code"]}))
  kept, _ = flexolmo.load(str(path), experts=["public", "code"], progress=False)
  assert kept.cfg.names() == ["public", "code"] and kept.expert_mask is None and kept.top_k == 2
  model, _ = flexolmo.load(str(path), progress=False)
  assert model.select_experts(["public", "code"]) == ["public", "code"]
  assert model.expert_mask.numpy().tolist() == [True, False, True] and model.top_k == 2
  assert model.select_experts(opt_out=["math", "code"]) == ["public"] and model.top_k == 1
  assert model.select_experts(["2", "math"]) == ["math", "code"]                 # indices work as names too
  assert model.select_experts([0, 2]) == ["public", "code"]                       # and as ints
  with pytest.raises(flexolmo.OlmoeError, match="unknown expert 3"): model.select_experts([3])
  assert model.select_experts() == ["public", "math", "code"] and model.expert_mask is None and model.top_k == 2
  with pytest.raises(flexolmo.OlmoeError, match="unknown expert 'poetry'"): model.select_experts(["poetry"])
  with pytest.raises(flexolmo.OlmoeError, match="every expert is excluded"): model.select_experts(opt_out=["0", "1", "2"])
  for bad in (["public", "math"], ["a", "a", "b"]):
    with pytest.raises(flexolmo.OlmoeError, match="expert_names"): flexolmo.FlexOlmoConfig.from_dict({**cfg, "expert_names": bad})


def test_config_defaults_are_transformers():
  from transformers import FlexOlmoConfig as HFConfig
  ours, theirs = flexolmo.FlexOlmoConfig.from_dict({"model_type": "flex_olmo"}), HFConfig()
  for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "rms_norm_eps",
            "num_experts", "num_experts_per_tok", "eos_token_id", "pad_token_id", "norm_topk_prob"):
    assert getattr(ours, f) == getattr(theirs, f), f
  assert ours.rope_theta == theirs.rope_parameters["rope_theta"] == 500000
  assert ours.names() == flexolmo.RELEASED_NAMES                                   # the released 7x7B layout says nothing
  assert flexolmo.FlexOlmoConfig.from_dict({"model_type": "flex_olmo", "num_hidden_layers": 2}).names() == list("0123456")
  assert flexolmo.FlexOlmoConfig.from_dict({"model_type": "flex_olmo", "clip_qkv": 1.0}).clip_qkv is None   # never clips
  with pytest.raises(flexolmo.OlmoeError, match="model_type 'olmoe'"): flexolmo.FlexOlmoConfig.from_dict({"model_type": "olmoe"})


def test_dolma2_tokenizer_through_flexolmo_load(tmp_path):
  fixtures = pytest.importorskip("tokenizer_fixtures", reason="tests/tokenizer_fixtures.py (dolma2 tokenizer.json) absent")
  from tokenizers import Tokenizer as HF
  path = save_flex(tmp_path, seed=9, with_tokenizer=False, vocab_size=100352, hidden_size=16, intermediate_size=8,
                   num_attention_heads=2, num_key_value_heads=2, num_experts=2, num_experts_per_tok=1, num_hidden_layers=1)
  fixtures.make_dolma2_tokenizer_json(path / "tokenizer.json")
  _, tok = flexolmo.load(str(path), progress=False)
  hf, enc = HF.from_file(str(path / "tokenizer.json")), fixtures.cl100k()
  for text in TEXTS[:6]:
    assert tok.encode(text) == hf.encode(text, add_special_tokens=False).ids == enc.encode_ordinary(text)
    assert tok.decode(tok.encode(text)) == text
  assert tok.encode("<|endoftext|>") == [100257] and tok.encode("<|pad|>") == [100277]   # the config's eos / pad


# ------------------------------------------- the recipe: train and merge -------------------------------------------

def digest(folder: Path) -> dict:
  return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}

def write_texts(root: Path) -> None:
  (root / "code.txt").write_text("def f(x):\n    return x + 1\n" * 60)
  (root / "prose.txt").write_text("The fox jumps over the dog. " * 60)

def ce(folder: Path, windows: np.ndarray) -> float:
  """Mean next-token cross-entropy of a checkpoint (loaded by flexolmo) on (n, T+1) windows."""
  model, _ = flexolmo.load(str(folder), progress=False)
  logits = model(Tensor(windows[:, :-1])).numpy().astype(np.float64)             # (n, T, V)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
  return float(-np.take_along_axis(logp, windows[:, 1:, None], -1).mean())

@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
  """A 1-expert public FlexOlmo, two owners trained on different text (inputs hashed before and after)."""
  root = tmp_path_factory.mktemp("recipe")
  public = save_flex(root / "public", seed=8, num_experts=1, num_experts_per_tok=1, **SMALL)
  write_texts(root)
  before = digest(public) | {f: hashlib.sha256((root / f).read_bytes()).hexdigest() for f in ("code.txt", "prose.txt")}
  losses = {n: flexolmo.train_expert(public, [root / f"{n}.txt"], root / n, n, steps=12, lr=3e-3, seq_len=16, batch=4,
                                     progress=False) for n in ("code", "prose")}
  assert digest(public) | {f: hashlib.sha256((root / f).read_bytes()).hexdigest() for f in ("code.txt", "prose.txt")} == before
  return root, public, losses


def test_train_expert_freezes_everything_but_the_new_expert(recipe):
  root, public, losses = recipe
  pub, own = load_file(str(public / "model.safetensors")), load_file(str(root / "code" / "model.safetensors"))
  assert set(own) - set(pub) == {f"model.layers.{l}.mlp.experts.1.{p}.weight" for l in range(2) for p in flexolmo.PARTS}
  for k, v in pub.items():
    if not k.endswith("mlp.gate.weight"): assert np.array_equal(own[k], v), k    # shared weights and public expert
  for l in range(2):
    for part in flexolmo.PARTS:
      e0, e1 = (own[f"model.layers.{l}.mlp.experts.{e}.{part}.weight"] for e in (0, 1))
      assert not np.array_equal(e1, e0), (l, part)                                # the owner's expert trained
    gate, gate0 = own[f"model.layers.{l}.mlp.gate.weight"], pub[f"model.layers.{l}.mlp.gate.weight"]
    assert gate.shape == (2, 32) and np.array_equal(gate[:1], gate0) and np.abs(gate[1]).sum() > 0
  assert json.loads((root / "code" / "config.json").read_text())["expert_names"] == ["public", "code"]
  assert (root / "code" / "tokenizer.json").read_bytes() == (public / "tokenizer.json").read_bytes()
  # the loss on the owner's data went down: the public model before, the 2-expert checkpoint after
  tok = flexolmo.Tokenizer.from_file(public / "tokenizer.json")
  windows = flexolmo.read_windows([root / "code.txt"], tok, 16, eos=0)[:8]
  assert ce(root / "code", windows) < ce(public, windows) - 0.1
  assert np.mean(losses["code"][-3:]) < np.mean(losses["code"][:3])


@pytest.mark.parametrize("router", ["learn", "fixed"])
def test_train_expert_router_row_is_the_domain_embedding(recipe, tmp_path, router):
  """Domain-informed rows: the owner's row in layer l is the input of layer l's MoE block in the public model
  (captured from transformers with a hook), averaged over the owner's windows and scaled to unit length. It stays
  exactly that with router="fixed" (while the expert trains) and, with lr ~ 0, with router="learn"."""
  import torch
  root, public, _ = recipe
  lr = 3e-3 if router == "fixed" else 1e-30
  flexolmo.train_expert(public, [root / "prose.txt"], tmp_path / "p", "prose", steps=2, lr=lr, seq_len=16, batch=4,
                        progress=False, router=router)
  sd = load_file(str(tmp_path / "p" / "model.safetensors"))
  gates = np.stack([sd[f"model.layers.{l}.mlp.gate.weight"][1] for l in range(2)])
  tok = flexolmo.Tokenizer.from_file(public / "tokenizer.json")
  windows = flexolmo.read_windows([root / "prose.txt"], tok, 16, eos=0)[:16]
  ref, seen = hf_reference(public), {}
  for l, layer in enumerate(ref.model.layers):
    layer.mlp.register_forward_pre_hook(lambda m, args, l=l: seen.__setitem__(l, args[0].mean((0, 1)).numpy()))
  with torch.no_grad(): ref(torch.tensor(windows[:, :-1], dtype=torch.long))
  want = np.stack([seen[l] / np.linalg.norm(seen[l]) for l in range(2)])
  np.testing.assert_allclose(gates, want, atol=1e-5)
  if router == "fixed":
    e1 = sd["model.layers.0.mlp.experts.1.up_proj.weight"]
    assert not np.array_equal(e1, sd["model.layers.0.mlp.experts.0.up_proj.weight"])    # the expert did train


def test_merge_loads_in_transformers_and_matches(recipe):
  root, public, _ = recipe
  before = {n: digest(root / n) for n in ("public", "code", "prose")}
  flexolmo.merge(public, [("code", root / "code"), ("prose", root / "prose")], root / "merged")
  assert {n: digest(root / n) for n in before} == before                           # inputs untouched
  cfg = json.loads((root / "merged" / "config.json").read_text())
  assert cfg["num_experts"] == 3 and cfg["num_experts_per_tok"] == 3 and cfg["expert_names"] == ["public", "code", "prose"]
  merged, pub = load_file(str(root / "merged" / "model.safetensors")), load_file(str(public / "model.safetensors"))
  for e, owner in enumerate(("code", "prose"), start=1):
    own = load_file(str(root / owner / "model.safetensors"))
    for l in range(2):
      for p in flexolmo.PARTS:
        assert np.array_equal(merged[f"model.layers.{l}.mlp.experts.{e}.{p}.weight"], own[f"model.layers.{l}.mlp.experts.1.{p}.weight"])
        assert np.array_equal(merged[f"model.layers.{l}.mlp.experts.0.{p}.weight"], pub[f"model.layers.{l}.mlp.experts.0.{p}.weight"])
      assert np.array_equal(merged[f"model.layers.{l}.mlp.gate.weight"][e], own[f"model.layers.{l}.mlp.gate.weight"][1])
  model, _ = flexolmo.load(str(root / "merged"), progress=False)
  assert max_diff(model, root / "merged", ids_for(4, T=10)) <= 1e-4


def test_train_router_changes_only_the_rows_and_lowers_the_loss(recipe, tmp_path):
  """RT: only the router rows of the merged model change, and transformers' loss on the proxy text goes down."""
  root, public, _ = recipe
  merged = root / "merged"
  if not merged.exists(): flexolmo.merge(public, [("code", root / "code"), ("prose", root / "prose")], merged)
  before = digest(merged)
  losses = flexolmo.train_router(merged, [root / "code.txt", root / "prose.txt"], tmp_path / "rt", steps=20, lr=3e-2,
                                 seq_len=16, batch=4, per_file=6, progress=False)
  assert digest(merged) == before and len(losses) == 20
  old, new = load_file(str(merged / "model.safetensors")), load_file(str(tmp_path / "rt" / "model.safetensors"))
  assert old.keys() == new.keys()
  for k in old:
    assert np.array_equal(old[k], new[k]) != k.endswith("mlp.gate.weight"), k     # the rows and nothing else changed
  assert json.loads((tmp_path / "rt" / "config.json").read_text()) == json.loads((merged / "config.json").read_text())
  tok = flexolmo.Tokenizer.from_file(public / "tokenizer.json")
  ids = torch.tensor(np.concatenate([flexolmo.read_windows([root / f], tok, 16, eos=0)[:4] for f in ("code.txt", "prose.txt")]),
                     dtype=torch.long)
  with torch.no_grad(): loss = {n: hf_reference(d)(ids, labels=ids).loss.item() for n, d in (("before", merged), ("after", tmp_path / "rt"))}
  assert loss["after"] < loss["before"] - 0.01, loss


def run_cli(*args):
  return subprocess.run([sys.executable, str(ROOT / "flexolmo.py"), *map(str, args)], capture_output=True, text=True,
                        timeout=600, env={**os.environ, "NOOPT": "1"})

def assert_clean_error(r, *words):
  assert r.returncode == 2, r.stderr
  line = r.stderr.strip()
  assert "\n" not in line and line.startswith("error:") and "Traceback" not in line, r.stderr
  for w in words: assert w in line, line


def test_merge_refuses_mismatched_inputs(recipe, tmp_path):
  root, public, _ = recipe
  def owner(name, edit=None, config=None):    # a copy of the prose owner, with one tensor or config field changed
    shutil.copytree(root / "prose", tmp_path / name)
    sd = load_file(str(tmp_path / name / "model.safetensors"))
    if edit: edit(sd)
    save_file(sd, str(tmp_path / name / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((tmp_path / name / "config.json").read_text())
    (tmp_path / name / "config.json").write_text(json.dumps({**cfg, **(config or {})}))
    return f"{name}={tmp_path / name}"
  def refused(*experts, words, out=tmp_path / "out"):
    ins = [public, root / "code", *(Path(e.split("=", 1)[1]) for e in experts)]
    before = {p: digest(p) for p in ins}
    args = [a for e in experts for a in ("--expert", e)]
    assert_clean_error(run_cli("merge", "--public", public, "--expert", f"code={root / 'code'}", *args, "--out", out), *words)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))   # nothing written
    assert {p: digest(p) for p in ins} == before                                   # inputs untouched
  k = "model.layers.0.self_attn.k_proj.weight"
  refused(owner("shared", lambda sd: sd.__setitem__(k, sd[k] + 1e-3)), words=["tensor " + k, "differs", "'shared'"])
  refused(owner("wide", config={"hidden_size": 64}), words=["hidden_size"])
  d = "model.layers.1.mlp.experts.1.down_proj.weight"
  refused(owner("shape", lambda sd: sd.__setitem__(d, sd[d][:, :8].copy())), words=[d, "F32 [32, 8]", "expected F32 [32, 16]"])
  g = "model.layers.0.mlp.gate.weight"
  refused(owner("nogate", lambda sd: sd.pop(g)), words=[g, "missing"])
  refused(f"code={root / 'prose'}", words=["distinct"])
  refused(words=["exists"], out=root / "code")                                      # never over an input
  refused(words=["inside an input"], out=public / "merged")


def test_dense_public_model_is_upcycled(tmp_path):
  """An OLMo 2 (dense) public model: the 2-expert model with both slots its FFN is the same function; after
  training, every dense weight is bit-identical, expert 0 is the dense MLP, and transformers agrees with us."""
  public = save_olmo2(tmp_path / "dense", seed=11)
  write_texts(tmp_path)
  config, raw = flexolmo.read_public(public)
  _, model = flexolmo.two_expert_model(config, raw)
  assert max_diff(model, public, ids_for(5)) <= 1e-4
  before = digest(public)
  flexolmo.train_expert(public, [tmp_path / "code.txt"], tmp_path / "code", "code", steps=3, lr=3e-3, seq_len=16, batch=4,
                        progress=False)
  assert digest(public) == before
  dense, own = load_file(str(public / "model.safetensors")), load_file(str(tmp_path / "code" / "model.safetensors"))
  for k, v in dense.items():
    if (m := re.fullmatch(r"model\.layers\.(\d+)\.mlp\.(\w+)\.weight", k)):
      assert np.array_equal(own[f"model.layers.{m[1]}.mlp.experts.0.{m[2]}.weight"], v), k
      assert not np.array_equal(own[f"model.layers.{m[1]}.mlp.experts.1.{m[2]}.weight"], v), k
    else: assert np.array_equal(own[k], v), k
  assert all(np.array_equal(own[f"model.layers.{l}.mlp.gate.weight"][0], np.zeros(32)) for l in range(2))   # no public text given
  model, _ = flexolmo.load(str(tmp_path / "code"), progress=False)
  assert max_diff(model, tmp_path / "code", ids_for(6)) <= 1e-4
  # merging one owner onto the dense public model gives the owner's tensors back
  flexolmo.merge(public, [("code", tmp_path / "code")], tmp_path / "merged")
  merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
  assert merged.keys() == own.keys() and all(np.array_equal(merged[k], own[k]) for k in own)


def test_cli_expert_selection_and_bad_input(recipe):
  root, public, _ = recipe
  merged = root / "merged"
  if not merged.exists(): flexolmo.merge(public, [("code", root / "code"), ("prose", root / "prose")], merged)
  r = run_cli("--model", merged, "--prompt", "def f", "--max-new-tokens", "3", "--experts", "public,code", "--show-routing")
  assert r.returncode == 0, r.stderr
  routing = [line for line in r.stdout.splitlines() if line.strip().startswith("L")]
  assert len(routing) == 3 * 2 and all("public" in line and "code" in line and "prose" not in line for line in routing)
  assert_clean_error(run_cli("--model", merged, "--prompt", "hi", "--experts", "poetry"), "unknown expert 'poetry'")
  assert_clean_error(run_cli("--model", merged, "--prompt", "hi", "--opt-out", "public,code,prose"), "every expert")
  assert_clean_error(run_cli("--model", root / "nowhere", "--prompt", "hi"), "nowhere")
  if not (flexolmo.DEMO_MODEL / "config.json").exists():          # no bundled demo model yet: say how to get one
    assert_clean_error(run_cli("--prompt", "hi"), "no model", "--model")
  assert_clean_error(run_cli("train-expert", "--public", public, "--data", root / "nope.txt", "--out", root / "x"), "nope.txt")
  assert_clean_error(run_cli("train-expert", "--public", root / "code.txt", "--data", root / "code.txt", "--out", root / "x"),
                     "code.txt")
  assert_clean_error(run_cli("train-expert", "--public", public, "--data", root / "code.txt", "--out", root / "x",
                             "--name", "public"), "public expert")
  assert_clean_error(run_cli("train-expert", "--public", public, "--data", root / "code.txt", "--out", root / "prose"), "exists")
  assert_clean_error(run_cli("train-router", "--model", public, "--data", root / "code.txt", "--out", root / "x",
                             "--steps", "0"), "--steps")
  assert_clean_error(run_cli("train-router", "--model", root / "code.txt", "--data", root / "code.txt", "--out", root / "x"),
                     "code.txt")
  assert_clean_error(run_cli("train-router", "--model", merged, "--data", root / "code.txt", "--out", root / "prose"), "exists")
  assert not (root / "x").exists()


def test_cli_attribution_on_the_demo():
  """`--attribution` prints, after the text, one line per prompt whose whole percents are the API's shares (from the
  routing `generate` yields for the same greedy run) rounded, summing to 100; the names are the kept experts'."""
  import olmoe_cli
  prompts, experts = ["def add(a, b):", "12 + 30 ="], ["public", "math"]
  r = run_cli("--model", flexolmo.DEMO_MODEL, *(a for p in prompts for a in ("--prompt", p)), "--max-new-tokens", "6",
              "--temperature", "0", "--experts", ",".join(experts), "--attribution")
  assert r.returncode == 0, r.stderr
  printed = [dict((n, int(p)) for n, p in re.findall(r"(\w+) (\d+)%", line.split(": ", 1)[1]))
             for line in r.stderr.splitlines() if line.startswith("attribution")]
  model, tok = flexolmo.load(str(flexolmo.DEMO_MODEL), experts, dtype=olmoe_cli.prepare_compiler(), progress=False)
  steps = list(flexolmo.olmoe.generate(model, [tok.encode(p) for p in prompts], 6, with_routing=True))
  shares = flexolmo.attribution(steps, model.cfg.names(), model.cfg.eos_ids)
  assert len(printed) == len(shares) == 2
  for pct, share in zip(printed, shares):
    assert sorted(pct) == sorted(share) == sorted(experts) and sum(pct.values()) == 100
    assert all(abs(pct[n] - 100 * share[n]) < 1 for n in experts), (pct, share)
