"""Faults around the files: runs killed mid-write, two processes writing the program cache at once, a tokenizer
larger than the model's vocabulary, weights or a KV cache larger than the machine's memory.

Oracles: the file system after a SIGKILL at random points, the safetensors library reading what is left, pickle
reading the cache file, and sizes computed by hand."""
import json, os, pickle, random, signal, subprocess, sys, time
from pathlib import Path
import numpy as np
import pytest
from conftest import ROOT, make_tokenizer_json
import olmoe, olmoe_checkpoint, olmoe_speedups
from olmoe_checkpoint import read_raw, to_raw, write_safetensors

D, I, V = 8, 4, 320


def flex_folder(path: Path, experts: int, rng, public: dict | None = None) -> Path:
  """A tiny FlexOlmo checkpoint with `experts` experts; with `public`, its shared tensors, expert 0 and router row 0
  are the public model's (as train-expert writes them)."""
  t = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,), "lm_head.weight": (V, D)}
  p = "model.layers.0."
  t.update({p + f"self_attn.{n}.weight": (D, D) for n in ("q_proj", "k_proj", "v_proj", "o_proj")})
  t.update({p + n: (D,) for n in ("self_attn.q_norm.weight", "self_attn.k_norm.weight", "post_attention_layernorm.weight",
                                  "post_feedforward_layernorm.weight")})
  for e in range(experts):
    t.update({p + f"mlp.experts.{e}.gate_proj.weight": (I, D), p + f"mlp.experts.{e}.up_proj.weight": (I, D),
              p + f"mlp.experts.{e}.down_proj.weight": (D, I)})
  tensors = {k: to_raw(rng.standard_normal(s).astype(np.float32), "F32") for k, s in t.items()}
  gate = rng.standard_normal((experts, D)).astype(np.float32)
  if public is not None:
    tensors.update({k: v for k, v in public.items() if ".mlp." not in k or ".experts.0." in k})
    gate[0] = np.frombuffer(public[p + "mlp.gate.weight"].data, np.float32)[:D]
  tensors[p + "mlp.gate.weight"] = to_raw(gate, "F32")
  path.mkdir(parents=True)
  write_safetensors(path / "model.safetensors", tensors)
  config = dict(model_type="flex_olmo", vocab_size=V, hidden_size=D, intermediate_size=I, num_hidden_layers=1,
                num_attention_heads=2, num_experts=experts, num_experts_per_tok=experts, max_position_embeddings=32,
                eos_token_id=0, pad_token_id=1)
  (path / "config.json").write_text(json.dumps(config))
  make_tokenizer_json(path)
  return path


def killed_at_random_points(tmp_path: Path, cmd) -> None:
  """SIGKILL `cmd(out)` at 8 random points of a run: under `out` there is either nothing or the whole folder (the
  files a complete run writes), and the next run leaves no partial folder behind."""
  subprocess.run(cmd(tmp_path / "warm"), check=True, capture_output=True, timeout=300)   # compiles: later runs are faster
  t0 = time.perf_counter()
  subprocess.run(cmd(tmp_path / "whole"), check=True, capture_output=True, timeout=300)
  whole = time.perf_counter() - t0                          # a run's time once the kernels are cached
  files = {f.name for f in (tmp_path / "whole").iterdir()}
  draw, complete = random.Random(7), 0
  for kill in range(8):
    out = tmp_path / f"out{kill}"
    p = subprocess.Popen(cmd(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(draw.uniform(0.3, 1.1) * whole)
    p.send_signal(signal.SIGKILL); p.wait()
    if out.exists():                                         # the rename happened before the kill: it is whole
      complete += 1
      assert {f.name for f in out.iterdir()} == files
      assert read_raw(out).keys() == read_raw(tmp_path / "whole").keys()
    else:
      r = subprocess.run(cmd(out), capture_output=True, text=True, timeout=300)   # the next run
      assert r.returncode == 0, r.stderr
    assert not list(tmp_path.glob(f".{out.name}.partial-*"))
  assert complete < 8                                        # some kills did land mid-run
  # a kill inside the write leaves `.NAME.partial-PID`; the next run removes it once that process is gone
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
  stale = tmp_path / f".again.partial-{dead.stdout.strip()}"
  stale.mkdir(); (stale / "model.safetensors").write_bytes(b"half")
  subprocess.run(cmd(tmp_path / "again"), check=True, capture_output=True, timeout=300)
  assert not stale.exists() and (tmp_path / "again" / "model.safetensors").exists()


def test_merge_killed_at_random_points_leaves_nothing_half_written(tmp_path):
  rng = np.random.default_rng(0)
  public = flex_folder(tmp_path / "public", 1, rng)
  owners = [flex_folder(tmp_path / n, 2, rng, read_raw(public)) for n in ("a", "b")]
  killed_at_random_points(tmp_path, lambda out: [sys.executable, str(ROOT / "flexolmo.py"), "merge", "--public",
                          str(public), "--expert", f"a={owners[0]}", "--expert", f"b={owners[1]}", "--out", str(out)])


def test_train_expert_killed_at_random_points_leaves_nothing_half_written(tmp_path):
  public = flex_folder(tmp_path / "public", 1, np.random.default_rng(1))
  (tmp_path / "owner.txt").write_text("an owner's own text, a few words repeated. " * 40)
  killed_at_random_points(tmp_path, lambda out: [sys.executable, str(ROOT / "flexolmo.py"), "train-expert", "--public",
                          str(public), "--data", str(tmp_path / "owner.txt"), "--out", str(out), "--steps", "6",
                          "--seq-len", "8", "--batch", "2"])


CACHE_WRITER = """
import sys, olmoe_speedups
from pathlib import Path
from tinygrad import Tensor
cache = olmoe_speedups.ProgramCache(Path(sys.argv[1]))
for n in range(int(sys.argv[2]), int(sys.argv[2]) + 12):
  cache.read()
  with cache.record(): (Tensor.ones(3, n) * n).sum(1).realize()     # a new program each time
  cache.write()
"""

def test_two_processes_writing_the_program_cache_at_once(tmp_path):
  path = tmp_path / "c.olmoe-programs.pkl"
  env = dict(os.environ, PYTHONPATH=str(ROOT), CACHEDB=str(tmp_path / "cache.db"))
  procs = [subprocess.Popen([sys.executable, "-c", CACHE_WRITER, str(path), str(start)], env=env,
                            stderr=subprocess.PIPE, text=True) for start in (1, 100)]
  for p in procs: assert p.wait(timeout=300) == 0, p.stderr.read()
  version, stored = pickle.loads(path.read_bytes())          # whole: one writer's file, never a mix
  assert version == olmoe_speedups.TINYGRAD and isinstance(stored, dict) and len(stored) >= 12
  assert olmoe_speedups.ProgramCache(path).read() == len(stored) and not list(tmp_path.glob("*.tmp"))


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path):
  folder = flex_folder(tmp_path / "m", 2, np.random.default_rng(1))
  config = json.loads((folder / "config.json").read_text())
  (folder / "config.json").write_text(json.dumps({**config, "model_type": "olmoe", "vocab_size": 200}))
  with pytest.raises(olmoe.OlmoeError, match="tokenizer.json has ids up to 299, config.json's vocab_size is 200"):
    olmoe.load(str(folder), progress=False)


def test_weights_and_a_kv_cache_larger_than_memory_are_refused_before_allocating(tmp_path, monkeypatch):
  import flexolmo
  folder = flex_folder(tmp_path / "m", 2, np.random.default_rng(2))
  weights = sum(np.prod(t.shape) * 4 for t in read_raw(folder).values())     # fp32 bytes, by hand
  monkeypatch.setattr(olmoe_checkpoint, "physical_memory", lambda: weights - 1)
  with pytest.raises(olmoe.OlmoeError, match=f"need {weights / 2**30:.1f} GiB"): flexolmo.load(str(folder), progress=False)
  monkeypatch.setattr(olmoe_checkpoint, "physical_memory", lambda: weights + 1)
  model, _ = flexolmo.load(str(folder), progress=False)
  cache = 2 * 1 * 2 * 32 * (D // 2) * 4 * 1                 # k and v, batch 1, 2 heads, 32 positions, hd 4, fp32, 1 layer
  monkeypatch.setattr(olmoe_checkpoint, "physical_memory", lambda: cache - 1)
  with pytest.raises(olmoe.OlmoeError, match="KV cache of 32 positions"): next(olmoe.generate(model, [[1, 2]], 2))
  monkeypatch.setattr(olmoe_checkpoint, "physical_memory", lambda: cache)
  assert len(list(olmoe.generate(model, [[1, 2]], 2, stop_ids=()))) == 2


def test_merge_inputs_with_config_values_of_the_wrong_type_are_one_line(tmp_path):
  rng = np.random.default_rng(3)
  public = flex_folder(tmp_path / "public", 1, rng)
  owner = flex_folder(tmp_path / "a", 2, rng, read_raw(public))
  for folder in (public, owner):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": "1"}))
    r = subprocess.run([sys.executable, str(ROOT / "flexolmo.py"), "merge", "--public", str(public), "--expert",
                        f"a={owner}", "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "num_hidden_layers = '1' is not int" in lines[0], r.stderr
    (folder / "config.json").write_text(json.dumps(config))


def test_merge_refuses_a_public_tokenizer_it_would_copy_broken(tmp_path):
  """merge copies the public model's tokenizer.json into its output: a malformed one is refused before anything is
  written, instead of producing a folder that cannot be loaded."""
  rng = np.random.default_rng(4)
  public = flex_folder(tmp_path / "public", 1, rng)
  owner = flex_folder(tmp_path / "a", 2, rng, read_raw(public))
  spec = json.loads((public / "tokenizer.json").read_text())
  (public / "tokenizer.json").write_text(json.dumps({**spec, "model": 8}))
  r = subprocess.run([sys.executable, str(ROOT / "flexolmo.py"), "merge", "--public", str(public), "--expert",
                      f"a={owner}", "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 2 and len(lines) == 1 and "malformed tokenizer.json" in lines[0], r.stderr
  assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))
