"""flexolmo.py against transformers' FlexOlmoForCausalLM (fp32, eager) on tiny random checkpoints it wrote, plus the
opt-out, merge and coordinated-training recipe checked against their definitions."""
import hashlib, json, re, subprocess, sys
from pathlib import Path
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from tinygrad import Tensor
from conftest import ROOT, TEXTS, save_hf_olmoe, hf_reference
import flexolmo

CONFIGS = {
  "gqa": dict(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2),
  "topk_below_E": dict(num_experts=6, num_experts_per_tok=3),
  "topk_equals_E": dict(num_experts=3, num_experts_per_tok=3, num_key_value_heads=1),
}

def save_flex(path, seed=0, **kw): return save_hf_olmoe(path, seed=seed, model_type="flex_olmo", **kw)

def ids_for(seed, B=2, T=12): return torch.randint(2, 320, (B, T), generator=torch.Generator().manual_seed(seed))


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
  E = cfg["num_experts"]
  keep = [e for e in range(E) if e not in gone]
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
  path = save_flex(tmp_path / "full", seed=5, **CONFIGS["topk_below_E"])
  model, _ = flexolmo.load(str(path), opt_out=[str(e) for e in gone], progress=False)
  assert model.top_k == min(3, 6 - len(gone))
  ids = ids_for(2)
  with torch.no_grad(): theirs = hf_reference(delete_experts(path, tmp_path / "cut", gone))(ids).logits.numpy()
  assert np.abs(model(Tensor(ids.numpy())).numpy() - theirs).max() <= 1e-4
  # and the routing never picks an excluded expert
  _, routing = model(Tensor(ids.numpy()), return_routing=True)
  assert not np.isin(np.concatenate([i.numpy() for i in routing.experts]), gone).any()


def test_expert_names_select_experts(tmp_path):
  path = save_flex(tmp_path, seed=6, num_experts=3, num_experts_per_tok=2)
  cfg = json.loads((path / "config.json").read_text())
  (path / "config.json").write_text(json.dumps({**cfg, "expert_names": ["public", "math", "code"]}))
  model, _ = flexolmo.load(str(path), experts=["public", "code"], progress=False)
  assert model.expert_mask.numpy().tolist() == [True, False, True] and model.top_k == 2
  assert model.select_experts(opt_out=["math", "code"]) == ["public"] and model.top_k == 1
  with pytest.raises(flexolmo.OlmoeError, match="unknown expert 'poetry'"): model.select_experts(["poetry"])
  with pytest.raises(flexolmo.OlmoeError, match="every expert is excluded"): model.select_experts(opt_out=["0", "1", "2"])


# ------------------------------------------- the recipe: train and merge -------------------------------------------

def digest(folder: Path) -> dict:
  return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}

@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
  """A 1-expert public FlexOlmo, two owners trained on different text, and their merge."""
  root = tmp_path_factory.mktemp("recipe")
  public = save_flex(root / "public", seed=8, num_experts=1, num_experts_per_tok=1, hidden_size=32,
                     intermediate_size=16, num_attention_heads=2, num_key_value_heads=2)
  (root / "code.txt").write_text("def f(x):\n    return x + 1\n" * 60)
  (root / "prose.txt").write_text("The fox jumps over the dog. " * 60)
  before = digest(public)
  losses = {n: flexolmo.train_expert(public, [root / f"{n}.txt"], root / n, n, steps=12, lr=3e-3, seq_len=16, batch=4,
                                     progress=False) for n in ("code", "prose")}
  assert digest(public) == before
  return root, public, losses


def test_train_expert_freezes_everything_but_the_new_expert(recipe):
  root, public, losses = recipe
  pub, own = load_file(str(public / "model.safetensors")), load_file(str(root / "code" / "model.safetensors"))
  for k, v in pub.items():
    if ".mlp." not in k: assert np.array_equal(own[k], v), k                       # shared weights untouched
  for l in range(2):
    for part in ("gate_proj", "up_proj", "down_proj"):
      e0, e1 = (own[f"model.layers.{l}.mlp.experts.{e}.{part}.weight"] for e in (0, 1))
      assert np.array_equal(e0, pub[f"model.layers.{l}.mlp.experts.0.{part}.weight"])   # public expert frozen
      assert not np.array_equal(e1, e0)                                                  # the owner's expert trained
    gate = own[f"model.layers.{l}.mlp.gate.weight"]
    assert np.array_equal(gate[0], pub[f"model.layers.{l}.mlp.gate.weight"][0]) and np.abs(gate[1]).sum() > 0
  assert losses["code"][-1] < losses["code"][0]
  assert json.loads((root / "code" / "config.json").read_text())["expert_names"] == ["public", "code"]


def test_merge_loads_in_transformers_and_matches(recipe):
  root, public, _ = recipe
  before = {n: digest(root / n) for n in ("public", "code", "prose")}
  flexolmo.merge(public, [("code", root / "code"), ("prose", root / "prose")], root / "merged")
  assert {n: digest(root / n) for n in before} == before                           # inputs untouched
  cfg = json.loads((root / "merged" / "config.json").read_text())
  assert cfg["num_experts"] == 3 and cfg["expert_names"] == ["public", "code", "prose"]
  merged, own = load_file(str(root / "merged" / "model.safetensors")), load_file(str(root / "prose" / "model.safetensors"))
  assert np.array_equal(merged["model.layers.1.mlp.experts.2.up_proj.weight"], own["model.layers.1.mlp.experts.1.up_proj.weight"])
  assert np.array_equal(merged["model.layers.1.mlp.gate.weight"][2], own["model.layers.1.mlp.gate.weight"][1])
  model, _ = flexolmo.load(str(root / "merged"), progress=False)
  ids = ids_for(4, T=10)
  with torch.no_grad(): theirs = hf_reference(root / "merged")(ids).logits.numpy()
  assert np.abs(model(Tensor(ids.numpy())).numpy() - theirs).max() <= 1e-4


def run_cli(*args):
  return subprocess.run([sys.executable, str(ROOT / "flexolmo.py"), *map(str, args)], capture_output=True, text=True, timeout=600)

def assert_clean_error(r, *words):
  assert r.returncode == 2, r.stderr
  line = r.stderr.strip()
  assert "\n" not in line and line.startswith("error:") and "Traceback" not in line, r.stderr
  for w in words: assert w in line, line


def test_merge_refuses_different_shared_weights(recipe, tmp_path):
  root, public, _ = recipe
  import shutil
  shutil.copytree(root / "prose", tmp_path / "bad")
  sd = load_file(str(tmp_path / "bad" / "model.safetensors"))
  sd["model.layers.0.self_attn.k_proj.weight"] = sd["model.layers.0.self_attn.k_proj.weight"] + 1e-3
  save_file(sd, str(tmp_path / "bad" / "model.safetensors"))
  r = run_cli("merge", "--public", public, "--expert", f"code={root / 'code'}", "--expert", f"bad={tmp_path / 'bad'}",
              "--out", tmp_path / "out")
  assert_clean_error(r, "model.layers.0.self_attn.k_proj.weight")
  assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))     # nothing written
  cfg = json.loads((tmp_path / "bad" / "config.json").read_text())
  (tmp_path / "bad" / "config.json").write_text(json.dumps({**cfg, "hidden_size": 64}))
  assert_clean_error(run_cli("merge", "--public", public, "--expert", f"bad={tmp_path / 'bad'}", "--out", tmp_path / "out"),
                     "hidden_size")
  assert_clean_error(run_cli("merge", "--public", public, "--expert", f"code={root / 'code'}", "--out", root / "code"), "exists")


def test_cli_expert_selection_and_bad_input(recipe):
  root, public, _ = recipe
  merged = root / "merged"
  if not merged.exists(): flexolmo.merge(public, [("code", root / "code"), ("prose", root / "prose")], merged)
  r = run_cli("--model", merged, "--prompt", "def f", "--max-new-tokens", "3", "--experts", "public,code", "--show-routing")
  assert r.returncode == 0, r.stderr
  assert "code" in r.stdout and "prose" not in r.stdout.split("\n", 1)[1]
  assert_clean_error(run_cli("--model", merged, "--prompt", "hi", "--experts", "poetry"), "unknown expert 'poetry'")
  assert_clean_error(run_cli("--model", merged, "--prompt", "hi", "--opt-out", "public,code,prose"), "every expert")
  assert_clean_error(run_cli("train-expert", "--public", public, "--data", root / "nope.txt", "--out", root / "x"), "nope.txt")
  assert not (root / "x").exists()


def test_dolma2_tokenizer_through_flexolmo_load(tmp_path):
  from test_tokenizer import make_dolma2_tokenizer_json, cl100k
  from tokenizers import Tokenizer as HF
  path = save_flex(tmp_path, seed=9, with_tokenizer=False, vocab_size=100352, hidden_size=16, intermediate_size=8,
                   num_attention_heads=2, num_key_value_heads=2, num_experts=2, num_experts_per_tok=1, num_hidden_layers=1)
  make_dolma2_tokenizer_json(path / "tokenizer.json")
  model, tok = flexolmo.load(str(path), progress=False)
  hf, enc = HF.from_file(str(path / "tokenizer.json")), cl100k()
  for text in TEXTS[:6]:
    assert tok.encode(text) == hf.encode(text).ids == enc.encode_ordinary(text)


def test_config_defaults_are_transformers():
  from transformers import FlexOlmoConfig as HFConfig
  ours, theirs = flexolmo.FlexOlmoConfig.from_dict({"model_type": "flex_olmo"}), HFConfig()
  for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "rms_norm_eps",
            "num_experts", "num_experts_per_tok", "eos_token_id", "pad_token_id", "norm_topk_prob"):
    assert getattr(ours, f) == getattr(theirs, f), f
  assert ours.rope_theta == theirs.rope_parameters["rope_theta"] == 500000
  assert ours.names() == flexolmo.RELEASED_NAMES                                   # the released 7x7B shape
