"""The captured-step cache (olmoe_speedups.StepCache): a new process replays the steps an earlier one captured, with
its own weights, and every way a stored step could be wrong is refused.

Oracles: transformers' greedy tokens, and generation on stock tinygrad (the accelerations and their caches off)."""
import os, shutil, subprocess, sys
import pytest
import torch
from tinygrad.helpers import Context
from conftest import ROOT, save_hf_olmoe, hf_reference
import olmoe, olmoe_speedups, flexolmo

PROMPT = [5, 17, 99, 3, 250, 7, 42, 128, 64, 11, 200, 33, 90, 150, 8, 21, 77, 310, 2, 45]   # longer than PROMPT_STEPS:
# a prefill step, then decode steps
NEW = 6

pytestmark = pytest.mark.skipif(not olmoe_speedups.usable("CPU"), reason="the step cache is part of the accelerations")


@pytest.fixture
def steps(tmp_path, monkeypatch):
  """The runner's step cache, in a folder of the test's own; a spy on what each `load` returned."""
  cache = olmoe_speedups.StepCache(tmp_path / "steps")
  monkeypatch.setattr(olmoe_speedups.runner("CPU"), "steps", cache)
  cache.loaded = []
  load = cache.load
  def spy(*a):
    out = load(*a)
    cache.loaded.append(out is not None)
    return out
  monkeypatch.setattr(cache, "load", spy)
  return cache

@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
  """Two checkpoints of one shape with different weights, and transformers' greedy tokens for each."""
  out = []
  for seed in (3, 4):
    path = save_hf_olmoe(tmp_path_factory.mktemp(f"seed{seed}"), seed=seed, with_tokenizer=False)
    with torch.no_grad():
      theirs = hf_reference(path).generate(torch.tensor([PROMPT]), max_new_tokens=NEW, do_sample=False,
                                           eos_token_id=None, pad_token_id=1)[0, len(PROMPT):].tolist()
    out.append((path, theirs))
  return out

def tokens(model, prompts=(PROMPT,), n=NEW) -> list:
  return [s.tokens for s in olmoe.generate(model, [list(p) for p in prompts], n, stop_ids=())]

def stock_tokens(path, monkeypatch, **load_kw) -> list:
  """The oracle: stock tinygrad's TinyJit, no accelerations and no cache."""
  with monkeypatch.context() as m:
    m.setattr(olmoe_speedups, "_enabled", False)
    return tokens(olmoe.load(str(path), progress=False, **load_kw)[0])

def files(cache) -> list: return sorted(cache.folder.glob("*.pkl"))


def test_a_new_model_replays_the_stored_steps_with_its_own_weights(ckpts, steps):
  """Steps captured with one checkpoint's weights replay with another's (same shape): the file names the weights,
  it does not hold them, and the second model generates its own transformers tokens."""
  (path_a, theirs_a), (path_b, theirs_b) = ckpts
  model_a = olmoe.load(str(path_a), progress=False)[0]
  assert [t[0] for t in tokens(model_a)] == theirs_a
  assert len(files(steps)) == 2 and steps.loaded == [False, False]       # prefill and decode, captured and stored
  model_b = olmoe.load(str(path_b), progress=False)[0]
  assert [t[0] for t in tokens(model_b)] == theirs_b
  assert steps.loaded == [False, False, True, True]                      # both replayed from the files
  contents = b"".join(f.read_bytes() for f in files(steps))
  for name, t in model_b.parameters().items():                           # no weight's bytes in any file
    raw = bytes(t.contiguous().realize().uop.buffer.as_memoryview())[:64]
    if len(set(raw)) > 4: assert raw not in contents, name


def test_another_model_shape_dtype_device_or_version_gets_another_key(ckpts, tmp_path, monkeypatch):
  (path, _), _ = ckpts
  cache = olmoe_speedups.StepCache(tmp_path)
  fp32 = olmoe.load(str(path), progress=False)[0]
  bf16 = olmoe.load(str(path), dtype="bfloat16", progress=False)[0]
  other = olmoe.load(str(save_hf_olmoe(tmp_path / "other", seed=3, with_tokenizer=False, num_experts_per_tok=3)),
                     progress=False)[0]
  for m in (fp32, bf16, other):
    for B in (1, 2): m._caches[B] = olmoe._kv_caches(m, B)
  base = cache.key(fp32, "prefill", (1, 16, True, 2), "CPU")
  again = olmoe.load(str(path), progress=False)[0]                      # the same checkpoint again: the same key
  again._caches[1] = olmoe._kv_caches(again, 1)
  assert base == cache.key(again, "prefill", (1, 16, True, 2), "CPU")
  keys = {
    "dtype": cache.key(bf16, "prefill", (1, 16, True, 2), "CPU"),
    "model": cache.key(other, "prefill", (1, 16, True, 3), "CPU"),
    "length": cache.key(fp32, "prefill", (1, 32, True, 2), "CPU"),
    "batch": cache.key(fp32, "prefill", (2, 16, True, 2), "CPU"),
    "masked": cache.key(fp32, "prefill", (1, 16, False, 2), "CPU"),
    "kind": cache.key(fp32, "decode", (1, 16, True, 2), "CPU"),
    "device": cache.key(fp32, "prefill", (1, 16, True, 2), "PYTHON"),
  }
  monkeypatch.setattr(olmoe_speedups, "TINYGRAD", "0.14.1")
  keys["version"] = cache.key(fp32, "prefill", (1, 16, True, 2), "CPU")
  monkeypatch.undo()
  with Context(NOOPT=1): keys["setting"] = cache.key(fp32, "prefill", (1, 16, True, 2), "CPU")
  with Context(NUM_CPU_THREADS=1): keys["threads"] = cache.key(fp32, "prefill", (1, 16, True, 2), "CPU")
  assert base not in keys.values() and len(set(keys.values())) == len(keys), keys


def test_a_step_of_another_dtype_or_prompt_length_is_not_used(ckpts, steps, monkeypatch):
  (path, _), _ = ckpts
  tokens(olmoe.load(str(path), progress=False)[0])                      # fp32, 16 prompt positions: stored
  assert len(files(steps)) == 2
  bf16 = tokens(olmoe.load(str(path), dtype="bfloat16", progress=False)[0])
  assert steps.loaded == [False, False, False, False] and len(files(steps)) == 4
  assert bf16 == stock_tokens(path, monkeypatch, dtype="bfloat16")
  long = PROMPT * 4                                                      # 20 tokens: 32 positions, another prefill
  model = olmoe.load(str(path), progress=False)[0]
  assert tokens(model, [long]) == tokens(olmoe.load(str(path), progress=False)[0], [long])
  assert steps.loaded[4:] == [False, True, True, True]                   # new prefill; then all from the files


def test_a_file_under_another_key_is_not_used(ckpts, steps, monkeypatch):
  """A file moved to another step's name (or holding another key) reads as absent: the key is checked inside."""
  (path, _), _ = ckpts
  tokens(olmoe.load(str(path), progress=False)[0])
  prefill, decode = files(steps)
  swapped = prefill.read_bytes()
  prefill.write_bytes(decode.read_bytes()); decode.write_bytes(swapped)
  assert tokens(olmoe.load(str(path), progress=False)[0]) == stock_tokens(path, monkeypatch)
  assert steps.loaded[2:] == [False, False]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_corrupt_step_file_is_ignored_and_replaced(ckpts, steps, monkeypatch, damage):
  (path, theirs), _ = ckpts
  tokens(olmoe.load(str(path), progress=False)[0])
  for f in files(steps):
    data = f.read_bytes()
    f.write_bytes({"truncated": data[:len(data) // 2], "garbage": os.urandom(len(data)), "empty": b""}[damage])
  assert [t[0] for t in tokens(olmoe.load(str(path), progress=False)[0])] == theirs
  assert steps.loaded[2:] == [False, False]
  assert [t[0] for t in tokens(olmoe.load(str(path), progress=False)[0])] == theirs
  assert steps.loaded[4:] == [True, True]                                # replaced by whole files
  assert not list(steps.folder.glob("*.tmp"))


def test_a_read_only_cache_folder_costs_only_speed(ckpts, steps, tmp_path):
  (path, theirs), _ = ckpts
  blocked = tmp_path / "file-not-folder"
  blocked.write_text("x")                      # a folder cannot be made under a file, even by root
  steps.folder = blocked / "steps"
  for _ in range(2): assert [t[0] for t in tokens(olmoe.load(str(path), progress=False)[0])] == theirs
  assert steps.loaded == [False, False, False, False] and blocked.read_text() == "x"
  if os.geteuid() != 0:                        # a real read-only folder, where permissions apply
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    steps.folder = ro
    assert [t[0] for t in tokens(olmoe.load(str(path), progress=False)[0])] == theirs
    assert not list(ro.iterdir())


def test_cachelevel_0_reads_and_writes_no_step(ckpts, steps):
  (path, theirs), _ = ckpts
  tokens(olmoe.load(str(path), progress=False)[0])
  before = {f: f.read_bytes() for f in files(steps)}
  shutil.rmtree(steps.folder)
  steps.folder.mkdir()
  for f, data in before.items(): f.write_bytes(data)
  with Context(CACHELEVEL=0):
    assert [t[0] for t in tokens(olmoe.load(str(path), progress=False)[0])] == theirs
    assert [t[0] for t in tokens(olmoe.load(str(path), progress=False)[0], [PROMPT * 4])] == \
      [t[0] for t in tokens(olmoe.load(str(path), progress=False)[0], [PROMPT * 4])]
  assert steps.loaded == [False, False] and {f: f.read_bytes() for f in files(steps)} == before


def test_flexolmo_with_an_expert_opted_out_replays_its_own_steps(steps, monkeypatch):
  demo = ROOT / "models" / "flexolmo-demo"
  last = flexolmo.load(str(demo), progress=False)[0].cfg.names()[-1]
  def run():
    model, _ = flexolmo.load(str(demo), progress=False)             # all experts, one masked (load would drop it)
    model.select_experts(opt_out=[last])
    assert model.expert_mask is not None
    return model, tokens(model)
  model, first = run()
  n = len(files(steps))
  _, second = run()
  assert n == 2 and steps.loaded == [False, False, True, True] and first == second
  with monkeypatch.context() as m:
    m.setattr(olmoe_speedups, "_enabled", False)
    _, stock = run()
  assert first == stock


WRITER = """
import sys, olmoe
model, _ = olmoe.load(sys.argv[1], progress=False)
print([s.tokens[0] for s in olmoe.generate(model, [PROMPT], 6, stop_ids=())])
"""

def test_two_processes_storing_the_same_steps_at_once(ckpts, tmp_path, monkeypatch):
  (path, theirs), _ = ckpts
  env = dict(os.environ, PYTHONPATH=str(ROOT), CACHEDB=str(tmp_path / "cache.db"))
  procs = [subprocess.Popen([sys.executable, "-c", f"PROMPT = {PROMPT}" + WRITER, str(path)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for _ in range(2)]
  for p in procs:
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    assert out.strip() == str(theirs)
  cache = olmoe_speedups.StepCache(tmp_path / "olmoe-steps")
  assert len(files(cache)) == 2 and not list(cache.folder.glob("*.tmp"))
  monkeypatch.setattr(olmoe_speedups.runner("CPU"), "steps", cache)
  cache.loaded, load = [], cache.load
  monkeypatch.setattr(cache, "load", lambda *a: cache.loaded.append((out := load(*a)) is not None) or out)
  assert [t[0] for t in tokens(olmoe.load(str(path), progress=False)[0])] == theirs
  assert cache.loaded == [True, True]                                    # each file whole, from one writer
