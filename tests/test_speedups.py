"""olmoe_speedups: the runtime accelerations change no result and nothing outside the project's own compiled steps.

Oracles: tinygrad's own launcher and replay (bit for bit), numpy, transformers' greedy tokens, and snapshots of every
tinygrad class and module global taken in a fresh process."""
import json, os, pickle, shutil, subprocess, sys, threading
from concurrent.futures import ThreadPoolExecutor
import numpy as np
import pytest
import torch
from tinygrad import Tensor
from tinygrad.engine.jit import CapturedJit
from tinygrad.helpers import Context
from tinygrad.runtime.ops_cpu import CPUProgram
import tinygrad.codegen
from conftest import ROOT, save_hf_olmoe, hf_reference
import olmoe, olmoe_speedups


SNAPSHOT_CHILD = """
import inspect, json, sys
import numpy as np
import tinygrad
from tinygrad import Tensor

def snapshot():
  # identity of every global of every tinygrad module and of every entry of every class defined there, and whether
  # it is code (a function, class, method or descriptor: what a patch would replace)
  out = {}
  code = lambda v: callable(v) or isinstance(v, (staticmethod, classmethod, property))
  for name, mod in list(sys.modules.items()):
    if mod is None or not (name == "tinygrad" or name.startswith("tinygrad.")): continue
    for attr, v in list(vars(mod).items()):
      out[f"{name}:{attr}"] = (id(v), code(v))
      if inspect.isclass(v) and v.__module__ == name:
        for a, w in list(vars(v).items()): out[f"{name}:{attr}.{a}"] = (id(w), code(w))
  return out

def changed(a, b, code_only=False):
  return sorted(k for k in a.keys() & b.keys() if a[k] != b[k] and (a[k][1] or not code_only))

(Tensor([1.0, 2.0]) * 3).realize()            # tinygrad imports its device runtime on first use: load it first
import tinygrad.engine.jit, tinygrad.engine.realize, tinygrad.runtime.ops_cpu, tinygrad.codegen, tinygrad.nn.optim
before = snapshot()
import olmoe, olmoe_tokenizer, olmoe_checkpoint, olmoe_cli, olmoe_speedups, flexolmo
after_import = snapshot()
cfg = olmoe.OlmoeConfig(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=1,
                        num_attention_heads=2, num_experts=4, num_experts_per_tok=2, max_position_embeddings=64)
model = olmoe.Olmoe(cfg)
model(Tensor([[1, 2, 3, 4]])).realize()
after_forward = snapshot()
steps = [s.tokens for s in olmoe.generate(model, [[1, 2, 3]], max_new_tokens=4, stop_ids=())]
steps += [s.tokens for s in olmoe.generate(model, [[1, 2, 3]], max_new_tokens=4, stop_ids=())]
after_generate = snapshot()
print(json.dumps({
  "import": changed(before, after_import),
  # a forward pass and generation fill tinygrad's caches and counters: compare the code (what a patch replaces)
  "forward": changed(after_import, after_forward, code_only=True),
  "generate": changed(after_import, after_generate, code_only=True),
  "n": len(before), "n_callables": sum(c for _, c in before.values()), "planned": olmoe_speedups.usable("CPU"),
  "classes": sorted({type(j.captured).__name__ for j in [*model._prefills.values(), *model._decoders.values()]}),
}))
"""

def test_import_and_use_leave_tinygrad_as_it_was(tmp_path):
  """`import olmoe` (and every other project module) changes no tinygrad global or class; neither does a forward
  pass nor generation with the accelerations, which are in place only while a compiled step runs and give only the
  project's own captured steps the planned replay."""
  env = dict(os.environ, PYTHONPATH=str(ROOT), CACHEDB=str(tmp_path / "cache.db"))
  r = subprocess.run([sys.executable, "-c", SNAPSHOT_CHILD], env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  assert out["n"] > 4000 and out["n_callables"] > 2000                   # the snapshot really covers tinygrad
  assert out["import"] == [] and out["forward"] == [] and out["generate"] == []
  assert out["planned"] and out["classes"] == ["PlannedCapturedJit"]    # the accelerations did run


def test_kernel_slices_run_on_other_threads_and_change_no_bit(monkeypatch):
  """tinygrad cuts a large CPU kernel into per-core slices; inside `slices_at_once` slices 1, 2, ... run on other
  threads. The product matches numpy, equals bit for bit the same kernel with its slices run in turn, and tinygrad's
  launcher is back afterwards."""
  rng = np.random.default_rng(0)
  a, b = rng.standard_normal((64, 512), dtype=np.float32), rng.standard_normal((512, 256), dtype=np.float32)
  ran_on, pool = set(), ThreadPoolExecutor(1)
  class Spy:                                             # the slice pool, noting which thread ran each slice
    def submit(self, fn, *args): return pool.submit(lambda: (ran_on.add(threading.get_ident()), fn(*args))[1])
  monkeypatch.setattr(olmoe_speedups, "_pool", Spy())
  stock = CPUProgram.__call__
  with Context(NUM_CPU_THREADS=2):                       # two slices per large kernel, whatever this machine has
    with olmoe_speedups.slices_at_once():
      assert CPUProgram.__call__ is not stock
      at_once = (Tensor(a) @ Tensor(b)).numpy()
    assert CPUProgram.__call__ is stock
    in_turn = (Tensor(a) @ Tensor(b)).numpy()
  assert ran_on and threading.get_ident() not in ran_on
  assert np.array_equal(at_once, in_turn) and np.allclose(at_once, a @ b, atol=1e-3)


def test_slices_at_once_survives_nesting_and_a_module_reload():
  """A reloaded module (as Jupyter's autoreload does) still restores tinygrad's own launcher."""
  import importlib
  stock = CPUProgram.__call__
  with olmoe_speedups.slices_at_once():
    reloaded = importlib.reload(olmoe_speedups)
    with reloaded.slices_at_once(): (Tensor.ones(4, 4) * 2).realize()
  assert CPUProgram.__call__ is stock


def test_planned_replay_gives_tinygrads_results(tmp_path):
  """generate replays its compiled prefill and decode steps from a plan; the greedy tokens and every routing weight
  of a padded batch equal, bit for bit, those of the same steps replayed by stock tinygrad (accelerations off)."""
  path = save_hf_olmoe(tmp_path / "ckpt", seed=4, with_tokenizer=False)
  def run(model):
    return [(s.tokens, s.weights) for s in olmoe.generate(model, [[5, 17, 99, 3], [7, 8]], max_new_tokens=8,
                                                          stop_ids=(), with_routing=True)]
  def kinds(model): return [type(j.captured) for j in [*model._prefills.values(), *model._decoders.values()]]
  planned, _ = olmoe.load(path, progress=False)
  ours = [run(planned) for _ in range(3)][-1]            # the prefill is captured on the 2nd call, planned from the 3rd
  assert kinds(planned) == [olmoe_speedups.PlannedCapturedJit] * 2
  olmoe_speedups.enable(False)
  try:
    plain, _ = olmoe.load(path, progress=False)
    theirs = [run(plain) for _ in range(3)][-1]
  finally: olmoe_speedups.enable(True)
  assert kinds(plain) == [CapturedJit] * 2
  assert len(ours) == len(theirs) == 8
  for (t1, w1), (t2, w2) in zip(ours, theirs): assert t1 == t2 and np.array_equal(w1, w2)


def test_accelerations_only_on_the_cpu_of_their_tinygrad_version(monkeypatch, capsys):
  assert olmoe_speedups.usable("CPU") and not olmoe_speedups.usable("PYTHON") and not olmoe_speedups.usable("CUDA")
  assert isinstance(olmoe_speedups.runner("CUDA"), olmoe_speedups.StockRunner)
  monkeypatch.setattr(olmoe_speedups, "TINYGRAD", "0.15.0")
  monkeypatch.setattr(olmoe_speedups, "_warned", False)
  assert isinstance(olmoe_speedups.runner("CPU"), olmoe_speedups.StockRunner)
  assert not olmoe_speedups.usable("CPU")
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "0.14.0" in err[0] and "0.15.0" in err[0]   # said once, not per call
  r = subprocess.run([sys.executable, "-c", "import olmoe_speedups; print(olmoe_speedups.usable('CPU'))"],
                     env=dict(os.environ, PYTHONPATH=str(ROOT), OLMOE_SPEEDUPS="0"), capture_output=True, text=True)
  assert r.stdout.strip() == "False"


LOWERING_CHILD = """
import json, sys, olmoe, olmoe_speedups, tinygrad.codegen
model, _ = olmoe.load(sys.argv[1], progress=False)
before = len(tinygrad.codegen.to_program_cache)
tokens = [s.tokens[0] for s in olmoe.generate(model, [[5, 17, 99, 3, 250]], max_new_tokens=6, stop_ids=())]
read = (olmoe_speedups.runner("CPU").programs_read or 0) if olmoe_speedups.usable("CPU") else 0   # before the steps
print(json.dumps({"tokens": tokens, "read": read, "new": len(tinygrad.codegen.to_program_cache) - before - read}))
"""

def test_a_fresh_process_reuses_the_lowered_kernels(tmp_path):
  """Without the captured steps, the second process reads every kernel its generation needs from the program cache
  (it lowers none) and still generates transformers' tokens; with CACHELEVEL=0 nothing is read or written."""
  path = save_hf_olmoe(tmp_path / "ckpt", seed=9, with_tokenizer=False)
  with torch.no_grad():
    theirs = hf_reference(path).generate(torch.tensor([[5, 17, 99, 3, 250]]), max_new_tokens=6, do_sample=False,
                                         eos_token_id=None, pad_token_id=1)[0, 5:].tolist()
  def run(**extra):
    env = dict(os.environ, CACHEDB=str(tmp_path / "cache.db"), PYTHONPATH=str(ROOT), **extra)
    r = subprocess.run([sys.executable, "-c", LOWERING_CHILD, str(path)], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.splitlines()[-1])
  first = run()
  assert first["read"] == 0 and first["new"] > 0 and (tmp_path / "cache.olmoe-programs.pkl").exists()
  shutil.rmtree(tmp_path / "olmoe-steps")                # else the steps come whole from the step cache
  second = run()
  assert first["tokens"] == second["tokens"] == theirs
  assert second["read"] > 0 and second["new"] == 0                    # nothing lowered beyond what the file held
  off = run(CACHELEVEL="0")
  assert off["read"] == 0 and off["tokens"] == theirs


def test_a_broken_program_cache_reads_as_empty(tmp_path, monkeypatch):
  bad = tmp_path / "c.olmoe-programs.pkl"
  cache = olmoe_speedups.ProgramCache(bad)
  monkeypatch.setattr(olmoe_speedups, "PROGRAM_CACHE_MAX", 3)
  bad.write_bytes(pickle.dumps((olmoe_speedups.TINYGRAD, {("k", i): None for i in range(4)})))   # one too many
  assert cache.read() == 0 and ("k", 0) not in tinygrad.codegen.to_program_cache
  monkeypatch.undo()
  bad.write_bytes(pickle.dumps(("0.0.1", {("k", 0): None})))                                     # another tinygrad's
  assert cache.read() == 0 and ("k", 0) not in tinygrad.codegen.to_program_cache
  bad.write_bytes(b"not a pickle")
  assert cache.read() == 0
  with cache.record(): (Tensor([[1.0, 2.0], [3.0, 4.5]]).exp() @ Tensor.ones(2, 2) * 7).realize()   # lowers programs
  assert len(cache.ours) > 0
  cache.write()                                          # the broken file is replaced, whole and readable
  assert olmoe_speedups.ProgramCache(bad).read() == len(cache.ours)
  assert not list(tmp_path.glob("*.tmp"))


def test_a_read_only_cache_folder_costs_only_speed(tmp_path):
  if os.geteuid() == 0: folder_blocked = tmp_path / "file-not-folder"; folder_blocked.write_text("x")
  else: folder_blocked = tmp_path / "ro"; folder_blocked.mkdir(mode=0o500)
  cache = olmoe_speedups.ProgramCache(folder_blocked / "sub" / "c.olmoe-programs.pkl")   # cannot be created
  assert cache.read() == 0
  with cache.record(): (Tensor([[1.0, 2.0]]).sin() * 3.25).realize()
  cache.write()                                          # no exception: generation would go on
  assert not (folder_blocked / "sub").exists()
