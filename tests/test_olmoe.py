"""olmoe.py against independent oracles: transformers' OlmoeForCausalLM (fp32, eager) on tiny random checkpoints it
wrote itself, numpy, and outputs computed by hand."""
import json, math, os, subprocess, sys
import numpy as np
import pytest
import torch
from tinygrad import Tensor, TinyJit, dtypes
from tinygrad.helpers import Context
from conftest import ROOT, save_hf_olmoe, hf_reference
import olmoe
from olmoe_tokenizer import TextStream

CONFIGS = {   # each one exercises a field of OlmoeConfig that changes the math
  "gqa": dict(num_key_value_heads=2),
  "clip_qkv": dict(clip_qkv=0.15),
  "renormalised_topk": dict(norm_topk_prob=True, num_experts_per_tok=3),
  "tied_embeddings": dict(tie_word_embeddings=True),
  "rope_linear": dict(rope_scaling={"rope_type": "linear", "factor": 4.0}, rope_theta=500.0),
  "rope_dynamic": dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=8),
  "top1_of_4": dict(num_experts=4, num_experts_per_tok=1, num_key_value_heads=1),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
  path = save_hf_olmoe(tmp_path_factory.mktemp(request.param), seed=len(request.param), **CONFIGS[request.param])
  model, _ = olmoe.load(str(path), progress=False)
  return request.param, model, hf_reference(path)


def test_logits_and_router_logits_match_transformers(pair):
  name, model, ref = pair
  ids = torch.randint(2, 320, (2, 13), generator=torch.Generator().manual_seed(3))
  with torch.no_grad(): out = ref(ids, output_router_logits=True)
  logits, routing = model(Tensor(ids.numpy()), return_routing=True)
  assert np.abs(logits.numpy() - out.logits.numpy()).max() <= 1e-4, name
  for ours, theirs in zip(routing.logits, out.router_logits):
    assert np.abs(ours.numpy() - theirs.numpy()).max() <= 1e-5
  # transformers' aux_loss is the load-balancing loss over all layers
  lb = olmoe.load_balancing_loss(routing.logits, model.cfg.num_experts, model.cfg.num_experts_per_tok, convention="transformers").item()
  assert abs(lb - out.aux_loss.item()) <= 1e-5


def test_padded_batch_matches_transformers(tmp_path):
  path = save_hf_olmoe(tmp_path, seed=5, num_key_value_heads=2)
  model, _ = olmoe.load(str(path), progress=False)
  ref = hf_reference(path)
  ids = torch.randint(2, 320, (3, 10), generator=torch.Generator().manual_seed(4))
  mask = torch.ones(3, 10, dtype=torch.long)
  mask[1, :4] = 0; mask[2, :9] = 0; ids[mask == 0] = 1                  # left padding
  with torch.no_grad(): out = ref(ids, attention_mask=mask, output_router_logits=True)
  logits, routing = model(Tensor(ids.numpy()), attention_mask=Tensor(mask.numpy()), return_routing=True)
  real = mask.numpy().astype(bool)                                      # padded positions carry no meaning
  assert np.abs(logits.numpy()[real] - out.logits.numpy()[real]).max() <= 1e-4
  lb = olmoe.load_balancing_loss(routing.logits, 8, 2, Tensor(mask.numpy()), "transformers").item()
  assert abs(lb - out.aux_loss.item()) <= 1e-5


def test_greedy_generation_matches_transformers_generate(tmp_path):
  path = save_hf_olmoe(tmp_path, seed=7, num_key_value_heads=2)
  model, _ = olmoe.load(str(path), progress=False)
  ref = hf_reference(path)
  prompts = [[5, 17, 99, 3, 250, 8, 41], [77, 12, 9]]
  ids = torch.tensor([prompts[0], [1] * 4 + prompts[1]])
  mask = torch.tensor([[1] * 7, [0] * 4 + [1] * 3])
  with torch.no_grad():
    theirs = ref.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, eos_token_id=None,
                          pad_token_id=1)[:, 7:].tolist()
  ours = [s.tokens for s in olmoe.generate(model, prompts, max_new_tokens=24, stop_ids=())]
  assert len(ours) == 24
  assert [list(r) for r in zip(*ours)] == theirs
  # a single prompt alone gives the same tokens as in the batch
  alone = [s.tokens[0] for s in olmoe.generate(model, prompts[1:], max_new_tokens=24, stop_ids=())]
  assert alone == theirs[1]
  # the compiled decode step and its KV cache are reused by later calls: a second call gives the same tokens
  again = [s.tokens for s in olmoe.generate(model, prompts, max_new_tokens=24, stop_ids=())]
  assert again == ours
  # prompts are padded to a multiple of 16 positions, so the third call replays the compiled prefill: prompts of
  # other lengths in that range give transformers' tokens as well
  shorter = [prompts[0][:5], prompts[1][1:]]
  with torch.no_grad():
    theirs2 = ref.generate(torch.tensor([shorter[0], [1] * 3 + shorter[1]]), max_new_tokens=24, do_sample=False,
                           attention_mask=torch.tensor([[1] * 5, [0] * 3 + [1] * 2]), eos_token_id=None,
                           pad_token_id=1)[:, 5:].tolist()
  ours2 = [s.tokens for s in olmoe.generate(model, shorter, max_new_tokens=24, stop_ids=())]
  assert [list(r) for r in zip(*ours2)] == theirs2
  # the single prompt, shorter than PROMPT_STEPS, ran through the decode step: no prefill of batch 1 was made
  assert list(model._prefills) == [(2, 16, True, model.top_k)] and len(prompts[1]) <= olmoe.PROMPT_STEPS


def test_dynamic_rope_generates_past_the_trained_length_like_transformers(tmp_path):
  """Dynamic NTK scaling recomputes the frequencies for every call's length; the cache grows past 8 positions."""
  path = save_hf_olmoe(tmp_path, seed=3, rope_scaling={"rope_type": "dynamic", "factor": 2.0},
                       max_position_embeddings=8, with_tokenizer=False)
  model, _ = olmoe.load(str(path), progress=False)
  prompt = [5, 17, 99, 3, 250]
  with torch.no_grad():
    theirs = hf_reference(path).generate(torch.tensor([prompt]), max_new_tokens=9, do_sample=False,
                                         eos_token_id=None, pad_token_id=1)[0, 5:].tolist()
  assert [s.tokens[0] for s in olmoe.generate(model, [prompt], 9, stop_ids=())] == theirs


def test_sharded_bf16_checkpoint_matches_transformers_in_bf16(tmp_path):
  path = save_hf_olmoe(tmp_path, seed=11, dtype=torch.bfloat16, max_shard_size="50KB", num_key_value_heads=2)
  assert (path / "model.safetensors.index.json").exists() and len(list(path.glob("model-*.safetensors"))) > 1
  model, _ = olmoe.load(str(path), progress=False)
  assert model.dtype == dtypes.bfloat16 and model.layers[0].mlp.experts.gate_up_proj.dtype == dtypes.bfloat16
  ref = hf_reference(path, dtype=torch.bfloat16)
  ids = torch.randint(2, 320, (1, 16), generator=torch.Generator().manual_seed(2))
  with torch.no_grad(): theirs = ref(ids).logits.float().numpy()
  ours = model(Tensor(ids.numpy())).float().numpy()
  # bf16 keeps 8 bits of mantissa: rounding points differ slightly from torch's kernels (stated tolerance:
  # within 2% of the logits' spread, and the same argmax almost everywhere)
  spread = theirs.std()
  assert np.abs(ours - theirs).max() <= 0.02 * spread * 10 and np.abs(ours - theirs).mean() <= 0.02 * spread
  assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.9
  # and the fp32 upcast of the same bf16 weights matches the fp32 reference exactly
  model32, _ = olmoe.load(str(path), dtype="float32", progress=False)
  with torch.no_grad(): ref32 = hf_reference(path)(ids).logits.numpy()
  assert np.abs(model32(Tensor(ids.numpy())).numpy() - ref32).max() <= 1e-4


def test_fused_expert_layout_loads_like_per_expert(tmp_path):
  """transformers 5 keeps experts fused in memory (gate_up_proj (E, 2I, D), down_proj (E, D, I)); accept both."""
  from safetensors.numpy import load_file, save_file
  path = save_hf_olmoe(tmp_path / "a", seed=13)
  sd = load_file(str(path / "model.safetensors"))
  fused = {k: v for k, v in sd.items() if ".experts." not in k}
  for l in range(2):
    g = np.stack([sd[f"model.layers.{l}.mlp.experts.{e}.gate_proj.weight"] for e in range(8)])
    u = np.stack([sd[f"model.layers.{l}.mlp.experts.{e}.up_proj.weight"] for e in range(8)])
    fused[f"model.layers.{l}.mlp.experts.gate_up_proj"] = np.concatenate([g, u], axis=1)
    fused[f"model.layers.{l}.mlp.experts.down_proj"] = np.stack([sd[f"model.layers.{l}.mlp.experts.{e}.down_proj.weight"] for e in range(8)])
  (tmp_path / "b").mkdir()
  save_file(fused, str(tmp_path / "b" / "model.safetensors"))
  (tmp_path / "b" / "config.json").write_text((path / "config.json").read_text())
  ids = Tensor([[3, 4, 5, 6, 7]])
  a, _ = olmoe.load(str(path), progress=False)
  b, _ = olmoe.load(str(tmp_path / "b"), progress=False)
  assert np.array_equal(a(ids).numpy(), b(ids).numpy())


# ----------------------------------------------- analytic tests -----------------------------------------------

def test_route_on_a_hand_example():
  # 4 experts, k=2: z = W_r h with h = (1, 0) picks column 0 of W_r: z = (2, 1, 0, -1)
  W = Tensor([[2.0, 0], [1.0, 0], [0.0, 0], [-1.0, 0]])
  z, g, i = olmoe.route(Tensor([[1.0, 0.0]]), W, 2)
  p = np.exp([2, 1, 0, -1]) / np.exp([2, 1, 0, -1]).sum()      # softmax by hand: .644, .237, .087, .032
  assert np.allclose(z.numpy(), [[2, 1, 0, -1]]) and i.numpy().tolist() == [[0, 1]]
  assert np.allclose(g.numpy(), [p[:2]], atol=1e-6) and g.numpy().sum() < 1        # OLMoE: no renormalisation
  _, g2, _ = olmoe.route(Tensor([[1.0, 0.0]]), W, 2, renormalise=True)
  assert np.allclose(g2.numpy(), [p[:2] / p[:2].sum()], atol=1e-6)
  # excluding expert 0 gives it no slot, and the softmax renormalises over the other three
  _, g3, i3 = olmoe.route(Tensor([[1.0, 0.0]]), W, 2, expert_mask=Tensor([False, True, True, True]))
  q = np.exp([1, 0, -1]) / np.exp([1, 0, -1]).sum()
  assert i3.numpy().tolist() == [[1, 2]] and np.allclose(g3.numpy(), [q[:2]], atol=1e-6)


def test_topk_ties_and_order():
  v, i = olmoe.topk(Tensor([[0.1, 0.5, 0.5, 0.2, 0.9]]), 3)
  assert i.numpy().tolist() == [[4, 1, 2]] and np.allclose(v.numpy(), [[0.9, 0.5, 0.5]])


def test_identity_experts_by_hand():
  """D = I = 2, identity gate/up/down matrices: expert(x) = silu(x) * x, so the MoE output is g-weighted copies."""
  cfg = olmoe.OlmoeConfig(hidden_size=2, intermediate_size=2, num_experts=2, num_experts_per_tok=2,
                          num_attention_heads=1, num_hidden_layers=1, vocab_size=4)
  moe = olmoe.SparseMoeBlock(cfg)
  eye = np.eye(2, dtype=np.float32)
  moe.gate = Tensor([[1.0, 0.0], [0.0, 1.0]])                       # z = h
  moe.experts.gate_up_proj = Tensor(np.stack([np.concatenate([eye, eye])] * 2))       # (E, 2I, D)
  moe.experts.down_proj = Tensor(np.stack([eye, 2 * eye]))                            # expert 1 doubles
  x = np.array([1.0, 3.0], dtype=np.float32)
  out, (z, g, i) = moe(Tensor(x.reshape(1, 1, 2)))
  silu = lambda t: t / (1 + np.exp(-t))
  p = np.exp(x) / np.exp(x).sum()                                  # router probabilities of experts 0, 1
  expected = p[0] * silu(x) * x + p[1] * 2 * silu(x) * x          # both experts chosen (k = E)
  assert i.numpy().tolist() == [[1, 0]]
  assert np.allclose(out.numpy().reshape(2), expected, rtol=1e-6)


@pytest.mark.parametrize("shape,K", [((7, 3), 5), ((300,), 4096), ((64, 8), 64)])   # many ties; few; chunks filled
def test_expert_order_sorts_pairs_by_expert_then_pair(shape, K):
  i = np.random.default_rng(1).integers(0, K, shape).astype(np.int32)
  perm, rank = olmoe.expert_order(Tensor(i), K)
  want = np.argsort(i.reshape(-1), kind="stable")                           # numpy's stable sort as the oracle
  assert (perm.numpy() == want).all() and (rank.numpy()[want] == np.arange(i.size)).all()


def test_expert_products_in_expert_order_match_numpy_and_the_one_token_path():
  """With several tokens `Experts` works on the pairs in expert order and puts the outputs back; each pair must get
  exactly its own expert's SwiGLU (`expert_ffn`), as with one token at a time and as numpy computes it."""
  rng = np.random.default_rng(2)
  N, k, E, D, I = 5, 3, 6, 16, 8
  h = rng.standard_normal((N, D), dtype=np.float32)
  i = np.stack([rng.permutation(E)[:k] for _ in range(N)]).astype(np.int32)   # (N, k) distinct per token
  gu, dn = rng.standard_normal((E, 2 * I, D), dtype=np.float32), rng.standard_normal((E, D, I), dtype=np.float32)
  experts = olmoe.Experts(olmoe.OlmoeConfig(hidden_size=D, intermediate_size=I, num_experts=E))
  experts.gate_up_proj, experts.down_proj = Tensor(gu), Tensor(dn)
  run = lambda hh, ii: experts(Tensor(hh), Tensor(ii)).numpy()
  silu = lambda x: x / (1 + np.exp(-x))
  want = np.array([[dn[e] @ (silu(gu[e, :I] @ h[n]) * (gu[e, I:] @ h[n])) for e in i[n]] for n in range(N)])
  ours, one_by_one = run(h, i), np.concatenate([run(h[n:n + 1], i[n:n + 1]) for n in range(N)])
  assert ours.shape == (N, k, D)
  assert np.allclose(ours, want, atol=1e-4) and np.allclose(ours, one_by_one, atol=1e-5)
  # the plain math on the pairs in their own order gives the same outputs
  plain = olmoe.expert_ffn(Tensor(np.repeat(h, k, 0)), Tensor(i.reshape(-1)), Tensor(gu), Tensor(dn)).numpy()
  assert np.allclose(plain.reshape(N, k, D), want, atol=1e-4)


def test_rms_norm_and_rope_by_hand():
  x = np.array([[3.0, 4.0]], dtype=np.float32)
  y = olmoe.rms_norm(Tensor(x), Tensor([1.0, 2.0]), 0.0).numpy()
  assert np.allclose(y, [[3 / math.sqrt(12.5), 8 / math.sqrt(12.5)]])
  # hd = 2: one frequency (1.0); position 1 rotates (a, b) to (a cos1 - b sin1, b cos1 + a sin1)
  cfg = olmoe.OlmoeConfig(hidden_size=2, num_attention_heads=1)
  cos, sin = olmoe.rope_tables(Tensor([[1]]), olmoe.rope_inv_freq(cfg))
  r = olmoe.apply_rope(Tensor([[[[1.0, 2.0]]]]), cos, sin).numpy().reshape(2)
  assert np.allclose(r, [math.cos(1) - 2 * math.sin(1), 2 * math.cos(1) + math.sin(1)], atol=1e-6)


def test_dot_and_linear_match_numpy():
  """dot sums in LANES partial sums when the length divides, in one sum otherwise; both are x @ w.T to rounding,
  with broadcasting over leading axes, and linear rounds bf16 inputs once at the end. linear takes the lanes for a
  one-row x and one sum per output for several rows: both paths are checked."""
  rng = np.random.default_rng(0)
  for K in (olmoe.LANES * 3, olmoe.LANES * 3 + 1):
    for rows in ((2, 3), (1, 1)):
      x, w = rng.standard_normal((*rows, K), dtype=np.float32), rng.standard_normal((5, K), dtype=np.float32)
      assert np.allclose(olmoe.linear(Tensor(x), Tensor(w)).numpy(), x @ w.T, atol=1e-5)
      assert np.allclose(olmoe.dot(Tensor(x[:, :, None]), Tensor(w)).numpy(), x @ w.T, atol=1e-5)   # (*rows, 5)
      xb, wb = Tensor(x).cast(dtypes.bfloat16), Tensor(w).cast(dtypes.bfloat16)
      exact = xb.float().numpy() @ wb.float().numpy().T
      ours = olmoe.linear(xb, wb)
      assert ours.dtype == dtypes.bfloat16
      assert np.allclose(ours.float().numpy(), exact, rtol=2 ** -8, atol=1e-6)
    assert np.allclose(olmoe.dot(Tensor(x[:, :, None]), Tensor(w), 1).numpy(), x @ w.T, atol=1e-5)


def test_load_balancing_and_z_loss_by_hand():
  # one layer, 2 tokens, 2 experts, k = 1: token 0 prefers expert 0 (p = .73), token 1 expert 1 (p = .88)
  z = Tensor([[1.0, 0.0], [0.0, 2.0]])
  p = np.array([[math.e / (math.e + 1), 1 / (math.e + 1)], [1 / (1 + math.e ** 2), math.e ** 2 / (1 + math.e ** 2)]])
  f = np.array([0.5, 0.5]); P = p.mean(0)                          # each expert got one of the two tokens
  assert abs(olmoe.load_balancing_loss([z], 2, 1, convention="transformers").item() - 2 * (f * P).sum()) < 1e-6
  assert abs(olmoe.load_balancing_loss([z], 2, 1).item() - 2 * (f * P).sum()) < 1e-6      # k = 1: the conventions agree
  zl = np.mean([math.log(math.e + 1) ** 2, math.log(1 + math.e ** 2) ** 2])
  assert abs(olmoe.router_z_loss([z]).item() - zl) < 1e-5
  # uniform P: transformers' form gives k, whatever E is (it does not divide by k); OLMoE's gives 1
  assert abs(olmoe.load_balancing_loss([Tensor.zeros(8, 4)], 4, 2, convention="transformers").item() - 2.0) < 1e-6   # E * sum_e f_e / E = sum_e f_e = k
  assert abs(olmoe.load_balancing_loss([Tensor.zeros(8, 4)], 4, 2).item() - 1.0) < 1e-6


def test_uniform_routing_gives_k():
  # every token routed evenly: 4 tokens, 4 experts, k = 2, logits chosen so p is uniform but top-2 rotates
  eps = 1e-3
  z = Tensor([[eps, eps, 0, 0], [0, eps, eps, 0], [0, 0, eps, eps], [eps, 0, 0, eps]])
  assert abs(olmoe.load_balancing_loss([z], 4, 2, convention="transformers").item() - 2.0) < 1e-2
  assert abs(olmoe.load_balancing_loss([z], 4, 2).item() - 1.0) < 1e-2


def test_sampling_is_seeded_and_follows_the_distribution():
  logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
  draw = lambda seed, **kw: [int(olmoe.sample(logits, np.random.default_rng(seed), temperature=1.0, **kw)[0]) for _ in range(1)]
  rng = np.random.default_rng(0)
  counts = np.bincount([olmoe.sample(logits, rng, 1.0)[0] for _ in range(4000)], minlength=4) / 4000
  assert np.abs(counts - [0.5, 0.3, 0.15, 0.05]).max() < 0.03
  rng = np.random.default_rng(0)
  counts = np.bincount([olmoe.sample(logits, rng, 1.0, top_k=2)[0] for _ in range(4000)], minlength=4) / 4000
  assert counts[2:].sum() == 0 and abs(counts[0] - 0.5 / 0.8) < 0.03
  rng = np.random.default_rng(0)
  counts = np.bincount([olmoe.sample(logits, rng, 1.0, top_p=0.7)[0] for _ in range(2000)], minlength=4)
  assert counts[2:].sum() == 0                                     # 0.5 + 0.3 >= 0.7: the nucleus is {0, 1}
  assert olmoe.sample(logits, np.random.default_rng(1), 0.0)[0] == 0
  assert draw(5) == draw(5)


def test_text_stream_holds_back_incomplete_utf8():
  class Bytes:   # a tokenizer whose tokens are single bytes
    def decode_bytes(self, ids): return bytes(ids)
  s = TextStream(Bytes())
  euro = "€".encode()                                              # 3 bytes
  assert [s.push(b) for b in euro] == ["", "", "€"] and s.push(ord("a")) == "a" and s.flush() == ""


def test_a_training_step_lowers_the_loss():
  from tinygrad.nn.optim import AdamW
  from tinygrad.helpers import Context
  cfg = olmoe.OlmoeConfig(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=1,
                          num_attention_heads=2, num_experts=4, num_experts_per_tok=2)
  Tensor.manual_seed(0)
  model = olmoe.Olmoe(cfg)
  params = list(model.parameters().values())
  for p in params: p.requires_grad = True
  opt = AdamW(params, lr=3e-3)
  ids = Tensor(np.random.default_rng(0).integers(0, 64, (4, 16)))
  losses = []
  @TinyJit
  def step(ids):
    opt.zero_grad()
    loss, parts = olmoe.lm_loss(model, ids)
    loss.backward()
    opt.step()
    return loss.realize()
  with Context(TRAINING=1):
    for _ in range(8): losses.append(step(ids).item())
  assert losses[-1] < losses[0] - 0.1
  assert all(math.isfinite(v) for v in losses)
  assert model.layers[0].mlp.gate.grad is not None                 # the router is trained through its weights


# ------------------------------------------------- bad input -------------------------------------------------

def run_cli(*args, cwd=ROOT):
  return subprocess.run([sys.executable, str(ROOT / "olmoe.py"), *args], capture_output=True, text=True, cwd=cwd,
                        timeout=600)

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  return save_hf_olmoe(tmp_path_factory.mktemp("cli"), seed=21)

def assert_clean_error(r, *words):
  assert r.returncode == 2, r.stderr
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in r.stderr, r.stderr
  for w in words: assert w in lines[0], lines[0]

def test_cli_generates(ckpt):
  r = run_cli("--model", str(ckpt), "--prompt", "The quick", "--max-new-tokens", "5", "--show-routing")
  assert r.returncode == 0, r.stderr
  assert r.stdout.startswith("The quick") and "L0" in r.stdout and "L1" in r.stdout

def test_cli_bad_input(ckpt, tmp_path):
  assert_clean_error(run_cli("--model", str(tmp_path / "nope"), "--prompt", "hi"), "no such folder")
  assert_clean_error(run_cli("--model", str(ckpt), "--prompt", ""), "empty prompt")
  assert_clean_error(run_cli("--model", str(ckpt), "--prompt", "hi", "--max-new-tokens", "0"), "max-new-tokens")
  assert_clean_error(run_cli("--model", str(ckpt), "--prompt", "hi", "--max-new-tokens", "-3"), "max-new-tokens")
  assert_clean_error(run_cli("--model", str(ckpt), "--prompt", "a b c d e f g h " * 40), "longer than")

def test_cli_hub_id_without_network_is_one_line(ckpt):
  env = dict(os.environ, HF_HUB_OFFLINE="1")
  r = subprocess.run([sys.executable, str(ROOT / "olmoe.py"), "--model", "nobody/no-such-model", "--prompt", "hi"],
                     capture_output=True, text=True, env=env, timeout=300)
  assert_clean_error(r, "nobody/no-such-model")

def broken_copy(ckpt, dst, edit=None, truncate=False, drop_weights=False):
  import shutil
  shutil.copytree(ckpt, dst)
  if edit:
    cfg = json.loads((dst / "config.json").read_text()); cfg.update(edit)
    (dst / "config.json").write_text(json.dumps(cfg))
  st = dst / "model.safetensors"
  if truncate: st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
  if drop_weights: st.unlink()
  return dst

def test_cli_bad_checkpoints(ckpt, tmp_path):
  assert_clean_error(run_cli("--model", str(broken_copy(ckpt, tmp_path / "a", drop_weights=True)), "--prompt", "hi"), "no model.safetensors")
  assert_clean_error(run_cli("--model", str(broken_copy(ckpt, tmp_path / "b", truncate=True)), "--prompt", "hi"), "truncated")
  assert_clean_error(run_cli("--model", str(broken_copy(ckpt, tmp_path / "c", edit={"hidden_size": 32})), "--prompt", "hi"), "shape")
  assert_clean_error(run_cli("--model", str(broken_copy(ckpt, tmp_path / "d", edit={"model_type": "llama"})), "--prompt", "hi"), "model_type")
  assert_clean_error(run_cli("--model", str(broken_copy(ckpt, tmp_path / "e", edit={"num_experts": 6})), "--prompt", "hi"), "experts")
  bad = broken_copy(ckpt, tmp_path / "f"); (bad / "config.json").unlink()
  assert_clean_error(run_cli("--model", str(bad), "--prompt", "hi"), "config.json")

BAD_CONFIGS = {   # a field of config.json with a value of the wrong type or out of range -> words of the one-line error
  "hidden_size as a string": ({"hidden_size": "64"}, "hidden_size = '64' is not int"),
  "hidden_size as a float": ({"hidden_size": 64.0}, "hidden_size = 64.0 is not int"),
  "negative experts": ({"num_experts": -1}, "num_experts = -1 must be in 1..2^31"),
  "no layers": ({"num_hidden_layers": 0}, "num_hidden_layers = 0"),
  "an absurd vocabulary": ({"vocab_size": 10 ** 12}, "vocab_size"),
  "rope_theta as text": ({"rope_theta": "big"}, "rope_theta = 'big' is not float"),
  "eos as text": ({"eos_token_id": "x"}, "eos_token_id"),
  "rope_parameters a list": ({"rope_parameters": [1]}, "rope_parameters"),
  "negative eps": ({"rms_norm_eps": -1.0}, "rms_norm_eps"),
  "a flag as text": ({"tie_word_embeddings": "yes"}, "tie_word_embeddings"),
  "a scaling factor as text": ({"rope_scaling": {"rope_type": "linear", "factor": "2"}}, "factor"),
  "NaN clip": ({"clip_qkv": float("nan")}, "clip_qkv"),
}

@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_config_values_of_the_wrong_type_or_range_are_one_clear_error(case):
  good = json.loads((ROOT / "models" / "olmoe-demo" / "config.json").read_text())
  olmoe.OlmoeConfig.from_dict(good)                                                  # the file itself is fine
  edit, words = BAD_CONFIGS[case]
  with pytest.raises(olmoe.OlmoeError) as e: olmoe.OlmoeConfig.from_dict({**good, **edit})
  assert words in str(e.value) and str(e.value).startswith("config.json:")

def test_cli_config_of_the_wrong_type(ckpt, tmp_path):
  assert_clean_error(run_cli("--model", str(broken_copy(ckpt, tmp_path / "g", edit={"intermediate_size": "32"})),
                             "--prompt", "hi"), "intermediate_size")

def test_ctrl_c_during_generation_keeps_the_text_and_exits_130(tmp_path):
  """SIGINT while tokens stream: what was generated stays on stdout, exit code 130, no traceback. (A long context
  and no EOS, so that generation is still running when the signal comes.)"""
  import signal, time
  path = save_hf_olmoe(tmp_path, seed=2, max_position_embeddings=8192, eos_token_id=None)
  p = subprocess.Popen([sys.executable, str(ROOT / "olmoe.py"), "--model", str(path), "--prompt", "The quick",
                        "--prompt", "A", "--max-new-tokens", "8000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, cwd=ROOT, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  # (a suite started in the background by a non-interactive shell inherits SIGINT ignored, and Python then never
  # turns Ctrl-C into KeyboardInterrupt: the command is given the disposition a terminal would give it)
  seen = p.stdout.read(len("The quick") + 3)                        # the prompt, then generated text
  time.sleep(0.5)
  p.send_signal(signal.SIGINT)
  out, err = p.communicate(timeout=120)
  assert p.returncode == 130, err
  assert seen.startswith("The quick") and len(seen) > len("The quick")
  assert "Traceback" not in err and "--- A" in out                 # the batch's other prompt, with its text so far


def test_a_prompt_that_extends_the_previous_one_reuses_its_cache_and_gives_the_same_tokens():
  """generate(..., reuse_cache=True) runs only the ids after the ones the previous call left in the KV cache (a chat's
  earlier turns): its tokens and routing equal a fresh run's of the whole prompt (bf16 demo: its 16-wide prompt
  extension copies bf16 values, the kernel that needs __truncsfbf2 on CPUs without AVX512-BF16). A prompt that
  leaves the held prefix, or another expert mask, runs from scratch. Run in a process of its own, as a chat is."""
  r = subprocess.run([sys.executable, "-c", "import test_olmoe; test_olmoe.reuse_checks(); print('ok')"],
                     capture_output=True, text=True, cwd=ROOT / "tests", timeout=600)
  assert r.returncode == 0 and r.stdout.endswith("ok\n"), r.stderr[-3000:]


def reuse_checks():
  model, tok = olmoe.load(str(ROOT / "models" / "olmoe-demo"), progress=False)
  run = lambda p, **kw: list(olmoe.generate(model, [p], 6, with_routing=True, **kw))
  first = tok.encode("The mixture of experts is")
  said = [s.tokens[0] for s in run(first, reuse_cache=True)]
  assert model._held[2] == first + said[:-1]                 # the last token was sampled, never fed back
  turn = first + said + tok.encode(" and then a second turn that is a little longer than sixteen tokens, to see")
  again = run(turn, reuse_cache=True)
  fresh = run(turn)
  assert [s.tokens for s in again] == [s.tokens for s in fresh]
  # the first turn (shorter than PROMPT_STEPS) went through the decode step, the fresh run through a prefill: the same
  # keys and values to bf16 rounding, so the same experts and weights within a few bf16 steps
  assert all((a.experts == b.experts).all() and np.abs(a.weights - b.weights).max() < 1e-2 for a, b in zip(again, fresh))
  assert model._held is None                                 # a call without reuse_cache leaves nothing to reuse
  run(turn, reuse_cache=True)
  assert olmoe.held_prefix(model, [turn[:5] + [7] + turn[6:]], model._held[0]) == 5     # up to the first change
  model.expert_mask = Tensor(np.arange(model.cfg.num_experts) != 3)
  try:
    key = (model.top_k, model.expert_mask.numpy().tobytes())
    assert olmoe.held_prefix(model, [turn + [5]], key) == 0                           # other experts: other keys
  finally: model.expert_mask = None


def test_routing_options_on_the_command_line_equal_transformers_with_that_routing(tmp_path):
  """--experts-per-token K is the same model with num_experts_per_tok=K; --disable-experts is the model with those
  experts deleted (their router rows and weights: the softmax over the others is the masked softmax). Oracle:
  transformers' greedy generation on checkpoints changed that way."""
  import torch
  from transformers import OlmoeForCausalLM
  src = save_hf_olmoe(tmp_path / "m", seed=5)                   # a seed whose greedy tokens change with k
  ref = hf_reference(src)
  cfg = ref.config
  def hf_text(model, new=6):
    from olmoe_tokenizer import Tokenizer
    tok = Tokenizer.from_file(src / "tokenizer.json")
    ids = tok.encode("The quick")
    with torch.no_grad():
      out = model.generate(torch.tensor([ids]), max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=1)
    return "The quick" + tok.decode(out[0, len(ids):].tolist()) + "\n", out[0, len(ids):].tolist()
  def ours(*flags):
    r = run_cli("--model", str(src), "--prompt", "The quick", "--max-new-tokens", "6", "--temperature", "0", *flags)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout
  k3 = OlmoeForCausalLM(type(cfg)(**{**cfg.to_dict(), "num_experts_per_tok": 3})).eval()
  k3.load_state_dict(ref.state_dict())
  (text3, ids3), (_, ids2) = hf_text(k3), hf_text(ref)
  assert ours("--experts-per-token", "3") == text3 and ids3 != ids2            # and k matters for these tokens
  off, keep = [1, 5], [e for e in range(cfg.num_experts) if e not in (1, 5)]
  fewer = OlmoeForCausalLM(type(cfg)(**{**cfg.to_dict(), "num_experts": len(keep)})).eval()
  state = {n: (p[keep] if ".mlp." in n else p) for n, p in ref.state_dict().items()}
  fewer.load_state_dict(state)
  text, ids = hf_text(fewer)
  assert ours("--disable-experts", "1,5") == text and ids != ids2
  for bad in (["--disable-experts", "8"], ["--disable-experts", "x"], ["--experts-per-token", "0"],
              ["--disable-experts", ",".join(map(str, range(8)))]):
    assert_clean_error(run_cli("--model", str(src), "--prompt", "hi", *bad), bad[0])
