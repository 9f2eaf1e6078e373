"""Weight-only int8 (olmoe_int8.py, `load(..., quantize="int8")`, `--quantize int8`).

Oracles: numpy's own computation of the rule (per output row, scale = max|w| / 127, q = round(w / scale)) on the
weights as the safetensors library reads them; the fp32 model of the same weights; the quantised model's own full
forward, without the compiled steps; the model's shapes from its config."""
import json, os, subprocess, sys
import numpy as np
import pytest
from tinygrad import Tensor, dtypes
from tinygrad.uop.ops import Ops
from conftest import ROOT, save_hf_olmoe
import olmoe, olmoe_int8, olmoe_speedups, flexolmo
from olmoe import OlmoeError

DEMO = ROOT / "models" / "olmoe-demo"
LONG_PROMPT = [5, 9, 17, 33, 2, 40, 61, 7, 88, 13, 21, 34, 55, 89, 144, 233, 3, 6, 12, 24]   # > PROMPT_STEPS: a prefill


def rule(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The int8 rule in float64, written out independently of olmoe_int8."""
  w = w.astype(np.float64)
  scale = np.abs(w).max(-1, keepdims=True) / 127
  q = np.zeros_like(w) if not scale.any() else np.round(np.divide(w, scale, out=np.zeros_like(w), where=scale > 0))
  return q, scale[..., 0]

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  return save_hf_olmoe(tmp_path_factory.mktemp("int8") / "m")

@pytest.fixture(scope="module")
def models(ckpt):
  ref, tok = olmoe.load(str(ckpt), "float32", progress=False)
  q, _ = olmoe.load(str(ckpt), "float32", progress=False, quantize="int8")
  return ref, q, tok


def test_quantize_int8_matches_numpy():
  """Stacked (E, out, in) weights with a zero row and a row of one value: q equals numpy's rule wherever w / scale is
  not within float32 rounding of a half (there fp32 and fp64 may round differently, by one step), scale equals it
  to float32 precision, and every dequantised weight is within scale / 2 of the original."""
  rng = np.random.default_rng(0)
  w = (rng.standard_normal((3, 5, 64)) * rng.uniform(0.01, 3, (3, 5, 1))).astype(np.float32)
  w[1, 2] = 0; w[2, 4] = -0.75
  q, scale = olmoe_int8.quantize_int8(w)
  q_ref, scale_ref = rule(w)
  assert q.dtype == np.int8 and q.shape == w.shape and scale.dtype == np.float32 and scale.shape == (3, 5)
  np.testing.assert_allclose(scale, scale_ref, rtol=1e-6)
  ratio = w.astype(np.float64) / np.where(scale_ref > 0, scale_ref, 1)[..., None]
  clear = np.abs(np.abs(ratio) % 1 - 0.5) > 1e-4
  assert (q[clear] == q_ref[clear]).all() and (np.abs(q - q_ref) <= 1).all()
  assert np.abs(q).max() == 127 and (q[1, 2] == 0).all() and (q[2, 4] == -127).all()
  assert (np.abs(q * scale[..., None].astype(np.float64) - w) <= scale[..., None] / 2 * (1 + 1e-5)).all()

def test_quantize_int8_refuses_non_finite():
  with pytest.raises(OlmoeError, match="inf or NaN"): olmoe_int8.quantize_int8(np.array([[1.0, np.nan]], np.float32))


def test_loaded_weights_are_the_rule_applied_to_the_file(ckpt, models):
  """Every large weight of the loaded model is numpy's rule applied to the checkpoint's tensor (read by the
  safetensors library), per expert; the norms, router and embeddings are the file's values."""
  from safetensors.numpy import load_file
  st = load_file(str(ckpt / "model.safetensors"))
  _, q, _ = models
  layer = q.layers[1]
  deq = lambda w: (lambda q_, s: q_ * s[..., None])(*rule(w))
  np.testing.assert_allclose(layer.self_attn.o_proj.numpy(), deq(st["model.layers.1.self_attn.o_proj.weight"]), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(q.lm_head.numpy(), deq(st["lm_head.weight"]), rtol=1e-6, atol=1e-7)
  for e in (0, 5):
    gate, up = (st[f"model.layers.1.mlp.experts.{e}.{p}_proj.weight"] for p in ("gate", "up"))
    np.testing.assert_allclose(layer.mlp.experts.gate_up_proj[e].numpy(), deq(np.concatenate([gate, up])), rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(layer.mlp.gate.numpy(), st["model.layers.1.mlp.gate.weight"])
  np.testing.assert_array_equal(q.embed_tokens.numpy(), st["model.embed_tokens.weight"])
  np.testing.assert_array_equal(layer.self_attn.q_norm.numpy(), st["model.layers.1.self_attn.q_norm.weight"])


def test_weights_held_in_memory_are_int8(models):
  """The bytes of the model's buffers: one byte per weight of the large tensors plus one fp32 scale per output row;
  the others as loaded (fp32 here). Counted from the config, independently of the loader."""
  ref, q, _ = models
  c = q.cfg
  D, I, E, V, L, A = c.hidden_size, c.intermediate_size, c.num_experts, c.vocab_size, c.num_hidden_layers, c.num_attention_heads * c.head_dim
  large = L * (4 * A * D + E * 3 * I * D) + V * D                        # q, k, v, o; gate, up, down; lm_head
  rows = L * (4 * A + E * (2 * I + D)) + V
  small = V * D + D + L * (2 * D + 2 * A + E * D)                          # embeddings, norms, router
  assert olmoe_int8.held_bytes(q) == {dtypes.int8: large, dtypes.float32: 4 * (rows + small)}
  assert olmoe_int8.held_bytes(ref) == {dtypes.float32: 4 * (large + small)}


def test_logits_close_to_fp32(models):
  """The quantised model against the fp32 model of the same weights, on 40 positions. Each weight moves by at most
  scale / 2 (uniform rounding noise of std max|w_row| / (127 * sqrt(12)), 0.5-0.7% of a row's std for these
  Gaussian rows of 32-64 entries), so each product is off by well under 1% of its size; through two layers the
  logits should stay within a few percent of their spread: mean |diff| < 3% and max < 25% of the fp32 logits' std
  (measured here: about 1% and 7%). Top-1 agrees at >= 90% of the positions (near-ties among 320 ids may flip)."""
  ref, q, _ = models
  ids = Tensor([[(7 * i + 3) % 320 for i in range(40)]])
  a, b = ref(ids).numpy()[0], q(ids).numpy()[0]
  d, std = np.abs(a - b), a.std()
  assert 0 < d.mean() < 0.03 * std and d.max() < 0.25 * std
  assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.9


def test_flexolmo_int8_close_to_fp32():
  """FlexOlmo loads with quantize="int8" too (the bundled demo, only the kept experts read): logits close to the
  fp32 model's, by the bound of test_logits_close_to_fp32."""
  demo = ROOT / "models" / "flexolmo-demo"
  ref, tok = flexolmo.load(str(demo), dtype="float32", progress=False)
  q, _ = flexolmo.load(str(demo), dtype="float32", progress=False, quantize="int8")
  assert dtypes.int8 in olmoe_int8.held_bytes(q)
  ids = Tensor([tok.encode("The quick brown fox jumps over the lazy dog and then")])
  a, b = ref(ids).numpy()[0], q(ids).numpy()[0]
  d = np.abs(a - b)
  assert 0 < d.mean() < 0.03 * a.std() and d.max() < 0.25 * a.std()


def greedy_by_forward(model, prompt: list[int], n: int) -> list[int]:
  """Greedy tokens from the full forward pass over the whole sequence each time: no KV cache, no compiled step."""
  ids = list(prompt)
  for _ in range(n): ids.append(int(model(Tensor([ids])).numpy()[0, -1].argmax()))
  return ids[len(prompt):]


def test_generate_with_step_cache_in_one_process(models, tmp_path, monkeypatch):
  """generate on the quantised model with the captured-step cache on, twice: the same tokens as the plain forward
  pass, steps stored in the cache folder, and none of them holding a weight (no weight buffer's bytes in a file)."""
  _, q, _ = models
  runner = olmoe_speedups.runner("CPU")
  if not isinstance(runner, olmoe_speedups.Runner): pytest.skip("the step cache is off (OLMOE_SPEEDUPS=0 or another tinygrad)")
  monkeypatch.setattr(runner, "steps", olmoe_speedups.StepCache(tmp_path / "steps"))
  prompt = LONG_PROMPT
  want = greedy_by_forward(q, prompt, 6)
  for _ in range(2): assert [s.tokens[0] for s in olmoe.generate(q, [prompt], 6, stop_ids=())] == want
  files = sorted((tmp_path / "steps").glob("*.pkl"))
  assert len(files) >= 2                                              # a prefill and the decode step
  bufs = {u for t in q.parameters().values() for u in t.uop.toposort() if u.op is Ops.BUFFER}
  big = [bytes(u.buffer.as_memoryview()) for u in bufs if u.buffer.nbytes >= 4096]   # the int8 stacks, lm_head, ...
  assert len(big) >= 5 and not any(w in f.read_bytes() for f in files for w in big)


def test_step_keys_differ_by_quantisation(ckpt, models):
  """A step of the quantised model is never a step of the same checkpoint loaded without quantisation."""
  ref, q, _ = models
  keys = olmoe_speedups.StepCache()
  assert keys.key(ref, "decode", (1, True, 2), "CPU") != keys.key(q, "decode", (1, True, 2), "CPU")


CHILD = """
import json, sys
from pathlib import Path
import olmoe_compiler; olmoe_compiler.use_cpu_target()
import olmoe, olmoe_speedups
model, _ = olmoe.load(sys.argv[1], "float32", progress=False, quantize="int8")
olmoe_speedups.runner("CPU").steps.folder = Path(sys.argv[2])
before = sorted(p.name for p in Path(sys.argv[2]).glob("*.pkl"))
tokens = [s.tokens[0] for s in olmoe.generate(model, [PROMPT], 6, stop_ids=())]
print(json.dumps({"tokens": tokens, "before": before}))
"""

def test_generate_with_step_cache_in_two_processes(ckpt, models, tmp_path):
  """Two processes, one after the other, sharing a step-cache folder: the second finds the first's steps and
  generates the same tokens, which are the plain forward pass's."""
  _, q, _ = models
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  run = lambda: subprocess.run([sys.executable, "-c", f"PROMPT = {LONG_PROMPT}" + CHILD, str(ckpt), str(tmp_path)],
                               env=env, capture_output=True, text=True, timeout=600)
  first = run(); assert first.returncode == 0, first.stderr[-3000:]
  second = run(); assert second.returncode == 0, second.stderr[-3000:]
  a, b = (json.loads(r.stdout.strip().splitlines()[-1]) for r in (first, second))
  assert a["before"] == [] and len(b["before"]) >= 2
  assert a["tokens"] == b["tokens"] == greedy_by_forward(q, LONG_PROMPT, 6)


def cli(script: str, *args):
  return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, timeout=600)

def test_cli_quantize_int8_on_the_demo():
  """`python olmoe.py --quantize int8` on the bundled demo runs and prints the prompt and a greedy continuation."""
  r = cli("olmoe.py", "--model", str(DEMO), "--prompt", "def add(a, b):", "--max-new-tokens", "8", "--temperature", "0",
          "--quantize", "int8")
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.startswith("def add(a, b):") and len(r.stdout.strip()) > len("def add(a, b):")

@pytest.mark.parametrize("script", ["olmoe.py", "flexolmo.py"])
def test_cli_bad_quantize_is_one_line(script):
  r = cli(script, "--prompt", "hi", "--quantize", "int4")
  assert r.returncode == 2 and r.stdout == ""
  assert r.stderr.strip().splitlines()[-1] == "error: unknown quantisation 'int4' (choices: int8)"
  assert "Traceback" not in r.stderr

def test_api_bad_quantize_is_an_olmoe_error():
  with pytest.raises(OlmoeError, match="unknown quantisation 'fp4'"): olmoe.load(str(DEMO), quantize="fp4", progress=False)
