"""The training path: gradients against transformers, the loss conventions against their sources, the balancing
switches against hand computations, and the training path's forward against the inference path."""
import math
import numpy as np
import pytest
import torch
from tinygrad import Tensor, TinyJit
from tinygrad.helpers import Context
from dataclasses import replace

import olmoe
from olmoe import OlmoeError
from conftest import save_hf_olmoe, hf_reference

GRAD_CONFIGS = {"k1": dict(num_experts_per_tok=1), "k2": dict(), "k2-renorm": dict(norm_topk_prob=True)}


@pytest.mark.parametrize("name", list(GRAD_CONFIGS))
def test_gradients_equal_transformers(tmp_path, name):
  path = save_hf_olmoe(tmp_path, seed=11 + len(name), num_key_value_heads=2, **GRAD_CONFIGS[name])
  model, _ = olmoe.load(str(path), progress=False)
  ref = hf_reference(path)
  ids = torch.randint(2, 320, (3, 12), generator=torch.Generator().manual_seed(5))
  ref.zero_grad()
  ref(ids, labels=ids).loss.backward()                                  # the mean next-token CE, no aux term
  params = model.parameters()
  for p in params.values(): p.requires_grad = True
  with Context(TRAINING=1):
    _, parts = olmoe.lm_loss(model, Tensor(ids.numpy()))
    parts["ce"].backward()
    ours = {k: p.grad.numpy() for k, p in params.items()}
  checked = 0
  for key, p in ref.named_parameters():
    k = key.removeprefix("model.").removesuffix(".weight")
    theirs = p.grad.numpy()
    assert k in ours, key
    g = ours[k] if ours[k].shape == theirs.shape else ours[k].swapaxes(-1, -2)
    rel = np.abs(g - theirs).max() / max(np.abs(theirs).max(), 1e-12)
    assert rel <= 1e-4, (name, key, rel)
    checked += 1
  assert checked == len(params)


def test_training_forward_equals_inference_forward(tmp_path):
  path = save_hf_olmoe(tmp_path, seed=3)
  model, _ = olmoe.load(str(path), progress=False)
  ids = Tensor(np.random.default_rng(0).integers(2, 320, (2, 11)))
  logits, routing = model(ids, return_routing=True)
  with Context(TRAINING=1): tlogits, trouting = model(ids, return_routing=True)
  assert np.abs(tlogits.numpy() - logits.numpy()).max() <= 1e-5
  for a, b in zip(routing.experts, trouting.experts): assert (a.numpy() == b.numpy()).all()   # same routing


def megablocks_lbl(tokens_per_expert, expert_scores, num_experts, top_k, loss_weight=1.0):
  """A transcription in numpy of megablocks' `batched_load_balancing_loss` (megablocks/layers/moe.py, 0.10.0):
  per-layer token counts (E,) and router scores (N, E) -> one scalar."""
  num_layers = len(tokens_per_expert)
  tokens = expert_scores[0].shape[0]
  scores = np.concatenate(expert_scores, axis=1).astype(np.float32).mean(0)
  counts = np.concatenate(tokens_per_expert).astype(np.float32)
  scale = (num_experts * loss_weight) / (num_layers * tokens * top_k)
  return scale * np.dot(counts, scores)


@pytest.mark.parametrize("E,k,L", [(8, 2, 3), (16, 4, 2), (4, 1, 1)])
def test_olmoe_convention_equals_megablocks(E, k, L):
  rng = np.random.default_rng(E * k + L)
  logits = [rng.normal(0, 2, (40, E)).astype(np.float32) for _ in range(L)]
  scores = [np.exp(z - z.max(1, keepdims=True)) / np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True) for z in logits]
  counts = [np.bincount(np.argsort(-s, axis=1, kind="stable")[:, :k].reshape(-1), minlength=E) for s in scores]
  ours = olmoe.load_balancing_loss([Tensor(z) for z in logits], E, k).item()
  assert abs(ours - megablocks_lbl(counts, scores, E, k)) <= 1e-5


def test_pooled_convention_misses_per_layer_collapse():
  # 2 layers, 4 experts, k = 1: layer 0 sends every token to expert 0 or 1, layer 1 to 2 or 3 (the review's example)
  big = 20.0
  z0 = Tensor([[big, 0, -big, -big], [0, big, -big, -big]] * 4)
  z1 = Tensor([[-big, -big, big, 0], [-big, -big, 0, big]] * 4)
  pooled = olmoe.load_balancing_loss([z0, z1], 4, 1, convention="transformers").item()
  per_layer = olmoe.load_balancing_loss([z0, z1], 4, 1).item()
  assert abs(pooled - 1.0) < 1e-3              # pooled f = P = 1/4 for every expert: looks balanced
  assert abs(per_layer - 2.0) < 1e-3           # each layer uses 2 of 4 experts: E * 2 * (1/2 * 1/2) = 2


def test_router_z_loss_is_the_mean_of_per_layer_means():
  zs = [np.random.default_rng(i).normal(0, 3, (5, 6)).astype(np.float32) for i in range(3)]
  lse = [np.log(np.exp(z.astype(np.float64)).sum(1)) for z in zs]
  assert abs(olmoe.router_z_loss([Tensor(z) for z in zs]).item() - np.mean([np.mean(x ** 2) for x in lse])) < 1e-4


def tiny(**over):
  cfg = olmoe.OlmoeConfig(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                          num_experts=4, num_experts_per_tok=2, **over)
  Tensor.manual_seed(0)
  return olmoe.Olmoe(cfg)


def test_coefficients_switch_terms_off_and_are_checked():
  model = tiny()
  ids = Tensor(np.random.default_rng(1).integers(0, 64, (2, 9)))
  total, parts = olmoe.lm_loss(model, ids, alpha=0, beta=0)
  assert abs(total.item() - parts["ce"].item()) < 1e-6
  total, parts = olmoe.lm_loss(model, ids, alpha=0.5, beta=0.25)
  assert abs(total.item() - (parts["ce"].item() + 0.5 * parts["lb"].item() + 0.25 * parts["z"].item())) < 1e-5
  for bad in (-0.1, float("nan"), "0.01", float("inf")):
    with pytest.raises(OlmoeError): olmoe.lm_loss(model, ids, alpha=bad)
  with pytest.raises(OlmoeError): olmoe.lm_loss(model, ids, convention="switch")
  for field, bad in (("capacity_factor", 0), ("capacity_factor", -1.0), ("router_bias_rate", -1e-3), ("router_aux_loss_coef", -1)):
    with pytest.raises(OlmoeError): replace(model.cfg, **{field: bad}).checked()


def test_capacity_keeps_first_choices_first():
  # 4 tokens, E = 3, k = 2; expert 0 is everyone's first choice, capacity 2
  i = Tensor([[0, 1], [0, 2], [0, 1], [1, 0]]).cast("int32")
  keep = olmoe.capacity_keep(i, 3, 2).numpy()
  # expert 0 queue (slot-major): t0s0, t1s0, t2s0, then t3s1 -> t0, t1 kept; expert 1: t3s0, t0s1, t2s1 -> t3, t0 kept
  assert keep.tolist() == [[True, True], [True, True], [False, False], [True, False]]
  assert olmoe.capacity_keep(i, 3, 8).numpy().all()                    # enough room: dropless


def test_capacity_factor_large_is_dropless_and_small_drops():
  ids = Tensor(np.random.default_rng(2).integers(0, 64, (2, 16)))
  base = tiny()
  ref = base(ids).numpy()
  roomy = tiny(capacity_factor=4.0)                                     # ceil(4 * N * k / E) >= N: nothing dropped
  assert np.abs(roomy(ids).numpy() - ref).max() == 0
  tight = tiny(capacity_factor=0.25)
  logits, routing = tight(ids, return_routing=True)
  g = routing.weights[0].numpy()
  assert (g == 0).sum() > 0 and np.abs(logits.numpy() - ref).max() > 0
  # per expert, the pairs kept never exceed the capacity
  C = math.ceil(0.25 * 32 * 2 / 4)
  e = routing.experts[0].numpy()
  assert max(((e == x) & (g != 0)).sum() for x in range(4)) <= C


def test_router_bias_steers_choice_not_weights():
  h = Tensor(np.random.default_rng(3).normal(size=(6, 32)).astype(np.float32))
  W = Tensor(np.random.default_rng(4).normal(size=(4, 32)).astype(np.float32))
  z, g, i = olmoe.route(h, W, 2)
  bias = Tensor([0.0, 0.0, 0.0, 5.0])                                   # expert 3 forced into every token's top 2
  zb, gb, ib = olmoe.route(h, W, 2, bias=bias)
  p = np.exp(z.numpy()) / np.exp(z.numpy()).sum(1, keepdims=True)
  assert (ib.numpy()[:, 0] == 3).all()
  assert np.allclose(gb.numpy(), np.take_along_axis(p, ib.numpy(), 1), atol=1e-6)   # weights: the unbiased p


def test_update_router_bias_moves_toward_underloaded_experts():
  model = tiny(router_bias_rate=0.1)
  ids = Tensor(np.random.default_rng(5).integers(0, 64, (2, 16)))
  _, routing = model(ids, return_routing=True)
  load = [np.bincount(e.numpy().reshape(-1), minlength=4) / e.numpy().size for e in routing.experts]
  olmoe.update_router_bias(model, routing)
  for l, layer in enumerate(model.layers):
    expect = 0.1 * np.sign(load[l].mean() - load[l])
    assert np.allclose(layer.mlp.expert_bias.numpy(), expect, atol=1e-7)
  assert not any("expert_bias" in k for k in model.parameters())       # state, not a trained weight
  with pytest.raises(OlmoeError): olmoe.update_router_bias(tiny(), routing)


def test_a_jitted_step_with_bias_and_capacity_lowers_the_loss():
  from tinygrad.nn.optim import AdamW
  model = tiny(router_bias_rate=0.01, capacity_factor=1.5)
  params = list(model.parameters().values())
  for p in params: p.requires_grad = True
  opt = AdamW(params, lr=3e-3)
  ids = Tensor(np.random.default_rng(0).integers(0, 64, (4, 16)))
  @TinyJit
  def step(ids):
    opt.zero_grad()
    logits, routing = model(ids, return_routing=True)
    loss, _ = olmoe.lm_loss(model, ids)
    loss.backward()
    opt.step()
    olmoe.update_router_bias(model, routing)
    return loss.realize()
  with Context(TRAINING=1): losses = [step(ids).item() for _ in range(8)]
  assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0] - 0.1
  assert np.abs(model.layers[0].mlp.expert_bias.numpy()).max() > 0


@pytest.mark.parametrize("b", [4, 16])
def test_experts_in_blocks_equals_the_per_pair_sum_and_its_gradients(b):
  # many blocks per expert (b small), an expert with no pair, and torch's autograd of the per-pair sum as the oracle
  N, D, E, k, I = 40, 16, 6, 2, 8
  rng = np.random.default_rng(b)
  h, Wgu, Wdn = rng.normal(size=(N, D)), rng.normal(size=(E, 2 * I, D)) * 0.3, rng.normal(size=(E, D, I)) * 0.3
  i = np.stack([rng.choice(E - 1, k, replace=False) for _ in range(N)])          # expert E-1 never chosen
  g = rng.random((N, k))
  th, tgu, tdn, tg = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (h, Wgu, Wdn, g))
  ti = torch.tensor(i)
  gu = torch.einsum("nd,nkod->nko", th, tgu[ti])                                 # (N, k, 2I)
  ref = (torch.einsum("nki,nkdi->nkd", torch.nn.functional.silu(gu[..., :I]) * gu[..., I:], tdn[ti]) * tg[..., None]).sum(1)
  c = torch.linspace(-1, 1, D, dtype=torch.float64)
  (ref * c).sum().backward()
  xs = [Tensor(a.astype(np.float32)) for a in (h, Wgu, Wdn, g)]
  for t in xs: t.requires_grad = True
  with Context(TRAINING=1):
    y = olmoe.experts_in_blocks(xs[0], xs[3], Tensor(i.astype(np.int32)), xs[1], xs[2], b)
    (y * Tensor(c.numpy().astype(np.float32))).sum().backward()
  assert np.abs(y.numpy() - ref.detach().numpy()).max() <= 1e-5
  for ours, theirs in zip(xs, (th, tgu, tdn, tg)):
    assert np.abs(ours.grad.numpy() - theirs.grad.numpy()).max() <= 1e-5 * max(1, np.abs(theirs.grad.numpy()).max())
  assert np.abs(xs[1].grad.numpy()[E - 1]).max() == 0                            # an unused expert gets no gradient


def test_embedding_gradient_sums_repeated_ids_and_leaves_absent_rows_zero():
  # numpy's unbuffered np.add.at is the oracle: repeated ids (14 in a run, a third of another row), ids never used
  rng = np.random.default_rng(4)
  V, D = 37, 5
  ids = rng.integers(0, V - 3, (3, 29)).astype(np.int32)
  ids[1, 3:17] = 7
  ids[2, :] = np.where(np.arange(29) % 3 == 0, 7, ids[2])
  W, dy = rng.normal(size=(V, D)).astype(np.float32), rng.normal(size=(3, 29, D)).astype(np.float32)
  w = Tensor(W)
  w.requires_grad = True
  with Context(TRAINING=1):
    y = olmoe.take(w, Tensor(ids))
    (y * Tensor(dy)).sum().backward()
  ref = np.zeros_like(W)
  np.add.at(ref, ids.reshape(-1), dy.reshape(-1, D))
  assert np.array_equal(y.numpy(), W[ids])
  assert np.abs(w.grad.numpy() - ref).max() <= 1e-5 * np.abs(ref).max()
  assert np.abs(w.grad.numpy()[V - 3:]).max() == 0


def test_cross_entropy_value_and_gradient_with_unlabelled_positions():
  # torch's cross_entropy (ignore_index=-100, mean over labelled positions) and its autograd are the oracle
  rng = np.random.default_rng(6)
  x, labels = rng.normal(size=(2, 9, 13)).astype(np.float32) * 3, rng.integers(0, 13, (2, 9))
  labels[0, :4] = -100
  tx = torch.tensor(x, requires_grad=True)
  ref = torch.nn.functional.cross_entropy(tx.reshape(-1, 13), torch.tensor(labels).reshape(-1), ignore_index=-100)
  ref.backward()
  t = Tensor(x)
  t.requires_grad = True
  with Context(TRAINING=1):
    ce = olmoe.cross_entropy(t, Tensor(labels.astype(np.int32)))
    ce.backward()
  assert abs(ce.item() - ref.item()) <= 1e-5 * abs(ref.item())
  assert np.abs(t.grad.numpy() - tx.grad.numpy()).max() <= 1e-6
