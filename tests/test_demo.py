"""The bundled demo models and the scripts that make them: the trainer on a tiny config, the checkpoints' recorded
hashes, seeded generation, the command line's default model, and the FlexOlmo demo's opt-out identity."""
import hashlib, json, subprocess, sys
from pathlib import Path
import numpy as np
import pytest
from conftest import ROOT, TEXTS, make_tokenizer_json, hf_reference

sys.path.insert(0, str(ROOT / "demo"))
MODELS = ROOT / "models"
BUNDLED = [MODELS / "olmoe-demo", MODELS / "flexolmo-demo"]


# ------------------------------------------------- the trainer -------------------------------------------------

TINY = ["--set", "hidden_size=32", "--set", "intermediate_size=16", "--set", "num_hidden_layers=2",
        "--set", "num_attention_heads=2", "--set", "num_experts=4", "--set", "vocab_size=320",
        "--set", "max_position_embeddings=64"]

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """demo/train.py for 40 steps of a tiny OLMoE on three made-up domains (run a), and the same run stopped after
  step 20 and resumed to 40 in a second process (run b)."""
  root = tmp_path_factory.mktemp("train")
  data = root / "data"; data.mkdir()
  for i, d in enumerate(("prose", "code", "math")):
    for part in ("train", "valid"):
      (data / f"{d}.{part}.txt").write_text("<|endoftext|>".join(TEXTS[i::3] * 3), encoding="utf-8")
  tok = make_tokenizer_json(root)
  cmd = [sys.executable, str(ROOT / "demo" / "train.py"), "--data", str(data), "--tokenizer", str(tok), "--seq-len", "32",
         "--batch-size", "8", "--warmup", "5", "--save-every", "20", "--dtype", "F32"] + TINY
  first = subprocess.run(cmd + ["--steps", "40", "--out", str(root / "a"), "--work", str(root / "wa")], capture_output=True, text=True)
  assert first.returncode == 0, first.stderr[-2000:]
  # the same run interrupted after step 20 (--stop-after leaves the resumable state), then resumed to 40
  stop = subprocess.run(cmd + ["--steps", "40", "--stop-after", "20", "--out", str(root / "b"), "--work", str(root / "wb")],
                        capture_output=True, text=True)
  assert stop.returncode == 0 and not (root / "b").exists(), stop.stderr[-2000:]
  resumed = subprocess.run(cmd + ["--steps", "40", "--resume", "--out", str(root / "b"), "--work", str(root / "wb")],
                           capture_output=True, text=True)
  assert resumed.returncode == 0 and "resumed" in resumed.stderr and "at step 20" in resumed.stderr, resumed.stderr[-2000:]
  return root

def test_training_lowers_the_loss(tiny_run):
  log = json.loads((tiny_run / "a" / "train_log.json").read_text())
  loss = log["loss_every_step"]
  assert len(loss) == 40
  assert np.mean(loss[-5:]) < np.mean(loss[:5]) - 0.5, (loss[:5], loss[-5:])
  assert all(lb > 0 for lb in log["lb_every_step"]) and all(z > 0 for z in log["z_every_step"])

def test_an_interrupted_and_resumed_run_equals_the_uninterrupted_one(tiny_run):
  a, b = (json.loads((tiny_run / r / "train_log.json").read_text())["loss_every_step"] for r in ("a", "b"))
  assert a == b
  assert (tiny_run / "a" / "model.safetensors").read_bytes() == (tiny_run / "b" / "model.safetensors").read_bytes()

def test_trained_checkpoint_runs_in_olmoe_py_as_in_transformers(tiny_run):
  """The trainer's output folder is a transformers checkpoint (per-expert keys) that olmoe.py reads to the same
  logits."""
  import torch, olmoe
  from tinygrad import Tensor
  root = tiny_run
  model, tok = olmoe.load(str(root / "a"), progress=False)
  ids = tok.encode("def add(a, b): return 12 + 30")
  ours = model(Tensor([ids])).numpy()
  with torch.no_grad(): theirs = hf_reference(root / "a")(torch.tensor([ids])).logits.numpy()
  assert np.abs(ours - theirs).max() < 1e-4
  keys = json.loads((root / "a" / "hashes.json").read_text())
  assert set(keys) == {"config.json", "model.safetensors", "tokenizer.json", "train_log.json", "generation_config.json"}
  from transformers import GenerationConfig                     # the sampling defaults, as transformers reads them
  assert GenerationConfig.from_pretrained(str(root / "a")).do_sample


def test_the_dense_public_model_is_an_olmo2_checkpoint_transformers_runs(tmp_path):
  """--arch olmo2 trains the FlexOlmo demo's public model as a one-expert FlexOlmo and writes it as a dense OLMo 2
  checkpoint (model_type olmo2, mlp.gate_proj/up_proj/down_proj, no router): transformers' Olmo2ForCausalLM on those
  files gives the logits of flexolmo.py's model built from them."""
  import torch, flexolmo
  from tinygrad import Tensor
  data = tmp_path / "data"; data.mkdir()
  for part in ("train", "valid"): (data / f"prose.{part}.txt").write_text("<|endoftext|>".join(TEXTS * 2), encoding="utf-8")
  cmd = [sys.executable, str(ROOT / "demo" / "train.py"), "--arch", "olmo2", "--domains", "prose", "--data", str(data),
         "--tokenizer", str(make_tokenizer_json(tmp_path)), "--seq-len", "32", "--batch-size", "4", "--steps", "6",
         "--warmup", "2", "--dtype", "F32", "--out", str(tmp_path / "pub"), "--work", str(tmp_path / "work")] + TINY
  r = subprocess.run(cmd, capture_output=True, text=True)
  assert r.returncode == 0, r.stderr[-2000:]
  config = json.loads((tmp_path / "pub" / "config.json").read_text())
  assert config["model_type"] == "olmo2" and config["architectures"] == ["Olmo2ForCausalLM"] and "num_experts" not in config
  cfg, raw = flexolmo.read_public(tmp_path / "pub")
  assert "model.layers.0.mlp.gate_proj.weight" in raw and "model.layers.0.mlp.gate.weight" not in raw
  _, model = flexolmo.two_expert_model(cfg, raw)          # both experts the public FFN: the dense function
  ids = [[5, 17, 200, 33, 9, 100, 2, 7]]
  with torch.no_grad(): theirs = hf_reference(tmp_path / "pub")(torch.tensor(ids)).logits.numpy()
  assert np.abs(model(Tensor(ids)).numpy() - theirs).max() < 1e-4

@pytest.mark.parametrize("extra,says", [
    (["--alpha", "-1"], "--alpha = -1.0 must be a number >= 0"),
    (["--beta", "nan"], "--beta = nan must be a number >= 0"),
    (["--set", "capacity_factor=0"], "capacity_factor = 0 must be > 0"),
    (["--seq-len", "65"], "longer than the model's context"),
    (["--set", "hidden_sise=64"], "unknown field 'hidden_sise'"),
    (["--set", "hidden_size=sixty"], "the value is not JSON"),
    (["--steps", "0"], "must be > 0"),
    (["--data", "EMPTY"], "missing or empty"),
])
def test_the_trainer_refuses_bad_input_in_one_line_and_writes_nothing(tmp_path, extra, says):
  """Invalid coefficients, a capacity <= 0, a batch longer than the context, an empty data folder: one line on
  stderr, exit 2, no output or work folder."""
  (tmp_path / "EMPTY").mkdir()
  extra = [str(tmp_path / "EMPTY") if x == "EMPTY" else x for x in extra]
  cmd = [sys.executable, str(ROOT / "demo" / "train.py"), "--data", str(tmp_path / "EMPTY"), "--out", str(tmp_path / "out"),
         "--work", str(tmp_path / "work"), "--seq-len", "32"] + TINY + extra
  if "--data" not in extra: cmd[cmd.index("--data") + 1] = str(ROOT / "demo" / "samples")   # any folder: checked later
  r = subprocess.run(cmd, capture_output=True, text=True)
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 2 and len(lines) == 1 and says in lines[0], r.stderr[-2000:]
  assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


# --------------------------------------------- the bundled checkpoints ---------------------------------------------

@pytest.mark.parametrize("folder", BUNDLED, ids=lambda p: p.name)
def test_bundled_files_match_the_recorded_hashes(folder):
  recorded = json.loads((folder / "hashes.json").read_text())
  assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(recorded)
  assert set(recorded) == {p.name for p in folder.iterdir() if p.name != "hashes.json"}
  for name, digest in recorded.items():
    assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name

def test_bundled_files_fit_the_size_budget():
  total = sum(p.stat().st_size for f in BUNDLED for p in f.iterdir())
  assert total <= 25e6, total

@pytest.mark.parametrize("folder", BUNDLED, ids=lambda p: p.name)
def test_bundled_model_equals_transformers(folder):
  """The bundled bf16 weights, upcast to fp32 on both sides, give transformers' logits."""
  import torch, olmoe, flexolmo
  from tinygrad import Tensor
  load = olmoe.load if folder.name.startswith("olmoe") else flexolmo.load
  model, tok = load(str(folder), dtype="float32", progress=False)
  ids = tok.encode("def add(a, b):\n    return a + b\nThe value of 12 + 30 = 42")
  ours = model(Tensor([ids])).numpy()
  with torch.no_grad(): theirs = hf_reference(folder)(torch.tensor([ids])).logits.numpy()
  assert np.abs(ours - theirs).max() < 1e-4

@pytest.mark.parametrize("folder", BUNDLED, ids=lambda p: p.name)
def test_bundled_model_generates_deterministically_with_a_seed(folder):
  import olmoe, flexolmo
  load = olmoe.load if folder.name.startswith("olmoe") else flexolmo.load
  model, tok = load(str(folder), progress=False)
  prompt = [tok.encode("The interpreter")]
  run = lambda seed: [s.tokens[0] for s in olmoe.generate(model, prompt, 12, temperature=1.0, seed=seed, stop_ids=())]
  a, b, c = run(7), run(7), run(8)
  assert a == b and len(a) == 12
  assert a != c                                   # sampling does depend on the seed

@pytest.mark.parametrize("script,name", [("olmoe.py", "olmoe-demo"), ("flexolmo.py", "flexolmo-demo")])
def test_command_line_runs_the_bundled_model_by_default(script, name):
  r = subprocess.run([sys.executable, str(ROOT / script), "--prompt", "def add(a, b):", "--max-new-tokens", "6"],
                     capture_output=True, text=True, cwd=ROOT.parent)
  assert r.returncode == 0, r.stderr[-2000:]
  assert f"models/{name}" in r.stderr and "--model allenai/" in r.stderr       # says what ran and how to run the real one
  assert r.stdout.startswith("def add(a, b):") and len(r.stdout) > len("def add(a, b):\n")

def test_flexolmo_demo_names_its_experts():
  import flexolmo
  model, _ = flexolmo.load(str(MODELS / "flexolmo-demo"), progress=False)
  assert model.cfg.names() == ["public", "code", "math"]
  assert model.select_experts(opt_out=["code"]) == ["public", "math"]

def test_flexolmo_results_support_what_the_docs_say():
  """docs/flexolmo.md describes demo/RESULTS.md: each expert beats the public model on its own domain, the merged
  model beats the public model on both owners' domains but not the specialists, opt-out equals the 2-expert model of
  the other owner, each 2-expert model already loses prose and the merged one lands between them, and of the router
  ablation: learned rows put the merged model far from the math specialist, fixed rows close, while learning wins a
  little on code and prose. After router training (RT, the bundled model) the merged model is within 0.15 nats of
  each specialist on its domain and of the public model on prose. The gaps table is the rows' differences."""
  res = json.loads((ROOT / "demo" / "flexolmo_results.json").read_text())
  ce, ab, gaps = res["cross_entropy"], res["ablation"], res["gaps"]
  pub, merged = ce["public only"], ce["merged (all experts)"]
  for owner, other in (("code", "math"), ("math", "code")):
    assert ce[f"public + {owner}"][owner] < pub[owner] - 0.5
    assert ce[f"public + {owner}"][owner] < merged[owner] < pub[owner]
    for d in ("prose", "code", "math"):
      assert ce[f"merged, {other} opted out"][d] == pytest.approx(ce[f"public + {owner}"][d], abs=2e-3)
  two = sorted(ce[f"public + {o}"]["prose"] for o in ("code", "math"))
  assert pub["prose"] < two[0] and two[0] < merged["prose"] < two[1]
  for r in ("fixed", "learn"):
    m = ab[f"router {r}: merged (all experts)"]
    assert gaps[r]["prose"] == pytest.approx(m["prose"] - pub["prose"], abs=2e-3)
    for o in ("code", "math"): assert gaps[r][o] == pytest.approx(m[o] - ab[f"router {r}: public + {o}"][o], abs=2e-3)
  assert gaps["learn"]["math"] > 0.5 and gaps["fixed"]["math"] < 0.15
  assert gaps["learn"]["code"] < gaps["fixed"]["code"] and gaps["learn"]["prose"] < gaps["fixed"]["prose"]
  assert res["meta"]["router"] == "fixed" and ab["router fixed: merged (all experts)"] == merged
  rt, rt_gaps = ce["merged, then RT (all experts)"], gaps["fixed, then RT"]
  assert rt_gaps["prose"] == pytest.approx(rt["prose"] - pub["prose"], abs=2e-3)
  for o in ("code", "math"): assert rt_gaps[o] == pytest.approx(rt[o] - ce[f"public + {o}"][o], abs=2e-3)
  assert max(rt_gaps.values()) < 0.15 and all(rt_gaps[d] < gaps["fixed"][d] for d in rt_gaps)
  assert (ROOT / "demo" / "RESULTS.md").read_text().count("|") > 20


# --------------------------------------------- generation_config.json ---------------------------------------------

GENERATION_CASES = [
  {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 50, "max_new_tokens": 64, "seed": 0, "eos_token_id": 0},
  {"do_sample": False, "temperature": 0.7, "eos_token_id": [0, 5]},        # greedy: the temperature is not used
  {"do_sample": True, "top_p": 0.5},                                       # transformers' defaults for the rest
  {"max_new_tokens": 9},
]

@pytest.mark.parametrize("spec", GENERATION_CASES)
def test_generation_config_reads_as_transformers_reads_it(spec, tmp_path):
  from transformers import GenerationConfig
  import olmoe_cli
  (tmp_path / "generation_config.json").write_text(json.dumps(spec))
  ours, theirs = olmoe_cli.generation_config(tmp_path), GenerationConfig.from_pretrained(str(tmp_path))
  if theirs.do_sample:                    # a value left unset is None here; generate() then uses these defaults
    default = GenerationConfig._get_default_generation_params()
    pick = lambda k: default[k] if getattr(theirs, k) is None else getattr(theirs, k)
    assert (ours["temperature"], ours["top_k"], ours["top_p"]) == (pick("temperature"), pick("top_k"), pick("top_p"))
  else: assert "temperature" not in ours                                 # greedy, as transformers decodes it
  assert ours.get("max_new_tokens") == theirs.max_new_tokens
  eos = theirs.eos_token_id
  assert ours["eos_ids"] == (() if eos is None else tuple(eos) if isinstance(eos, list) else (eos,))


def test_the_first_command_samples_with_the_bundled_settings_and_flags_override_them():
  """No flags: the demo's generation_config.json (sampling, seed 0) decides, so two runs print the same sampled text,
  the text generate() samples with those settings; --temperature 0 gives the greedy text."""
  import olmoe, olmoe_cli
  folder = MODELS / "olmoe-demo"
  spec = json.loads((folder / "generation_config.json").read_text())
  assert spec["do_sample"] and spec["seed"] == 0
  model, tok = olmoe.load(str(folder), progress=False)
  prompt = "The mixture of experts"
  def api(**kw):
    ids = [s.tokens[0] for s in olmoe.generate(model, [tok.encode(prompt)], **kw)]
    return prompt + tok.decode(ids[:next((n for n, t in enumerate(ids) if t in model.cfg.eos_ids), len(ids))]) + "\n"
  cli = lambda *a: subprocess.run([sys.executable, str(ROOT / "olmoe.py"), "--prompt", prompt, *a], capture_output=True,
                                  text=True, cwd=ROOT, timeout=600).stdout
  sampled = api(max_new_tokens=spec["max_new_tokens"], temperature=spec["temperature"], top_k=spec["top_k"],
                top_p=spec["top_p"], seed=spec["seed"])
  assert cli() == sampled != api(max_new_tokens=spec["max_new_tokens"])
  assert cli("--temperature", "0", "--max-new-tokens", "10") == api(max_new_tokens=10)


@pytest.mark.parametrize("bad", ['{"do_sample": true, "temperature": "hot"}', '{"top_p": 2, "do_sample": true}',
                                 '{"eos_token_id": "0"}', '[1]', '{"seed": -1}', '{"max_new_tokens": 0}', '{'])
def test_a_malformed_generation_config_is_one_line(bad, tmp_path):
  import shutil
  folder = shutil.copytree(MODELS / "olmoe-demo", tmp_path / "m")
  (folder / "generation_config.json").write_text(bad)
  r = subprocess.run([sys.executable, str(ROOT / "olmoe.py"), "--model", str(folder), "--prompt", "hi"],
                     capture_output=True, text=True, cwd=ROOT, timeout=600)
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 2 and len(lines) == 1 and "generation_config.json" in lines[0], r.stderr[-2000:]


def test_dtype_on_the_command_line_loads_the_bf16_demo_in_that_dtype():
  """--dtype float32 on the bf16 demo prints the fp32 model's greedy text, for a prompt whose bf16 text differs."""
  import olmoe
  prompt = "12 + 30 ="                                   # its first greedy token already differs between the dtypes
  texts = {}
  for dtype in ("float32", None):
    model, tok = olmoe.load(str(MODELS / "olmoe-demo"), dtype=dtype, progress=False)
    ids = [s.tokens[0] for s in olmoe.generate(model, [tok.encode(prompt)], 10)]
    texts[dtype] = prompt + tok.decode(ids[:next((n for n, t in enumerate(ids) if t in model.cfg.eos_ids), len(ids))]) + "\n"
  assert texts["float32"] != texts[None]
  r = subprocess.run([sys.executable, str(ROOT / "olmoe.py"), "--prompt", prompt, "--max-new-tokens", "10",
                      "--temperature", "0", "--dtype", "float32"], capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert r.returncode == 0 and r.stdout == texts["float32"], r.stderr[-2000:]
