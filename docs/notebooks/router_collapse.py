# %% [markdown]
# # Build it 3: router collapse, and two fixes
#
# Train a small MoE layer from scratch in numpy (router, top-k, experts, the gradients by hand), watch its router
# collapse onto a few experts when nothing balances it, then fix it with the load-balancing loss and with
# auxiliary-loss-free bias balancing. Each piece is checked against olmoe.py's own functions. The question and the
# written answers are on the course page "Build it" (docs/build.md).

# %%
# The repository root on the path, wherever the notebook runs inside the checkout.
import os, sys
from pathlib import Path
ROOT = next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "models" / "olmoe-demo").is_dir())
os.chdir(ROOT); sys.path.insert(0, str(ROOT))
import olmoe_compiler; olmoe_compiler.use_cpu_target()   # a CPU compile target clang can finish (bf16)

# %%
import numpy as np
from tinygrad import Tensor
import olmoe

N, D, E, k = 256, 16, 8, 2      # tokens per batch, width, experts, experts per token (OLMoE's k/E = 1/8 would need E = 16)
CLUSTERS = 8                    # the data: 8 kinds of token, each with its own linear map, so 8 experts have work

def data(rng, centres, maps, mean):
  """A batch: token h of kind c sits near centres[c] (plus a mean every token shares, as residual streams have);
  its target is maps[c] @ h. A shared mean lets a router with no bias term prefer some experts for every token."""
  c = rng.integers(0, CLUSTERS, N)
  h = rng.normal(size=(N, D)) * 0.5 + centres[c] + mean
  return h, np.einsum("nod,nd->no", maps[c], h)

def softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)

def route(h, W_r, bias):
  """OLMoE's router: p = softmax(W_r h) over all E; the k experts of largest p + bias (ties to the lower id), weighted
  by the unbiased p (DeepSeek-V3's bias steers the choice, never the mixture)."""
  p = softmax(h @ W_r.T)
  i = np.argsort(-(p + bias), axis=-1, kind="stable")[:, :k]               # (N, k)
  return p, i, np.take_along_axis(p, i, 1)

def lb_loss(p, i):
  """E * sum_e f_e P_e, f the share of the (token, slot) pairs on e, P the mean probability (balanced: 1)."""
  f = np.bincount(i.ravel(), minlength=E) / (N * k)
  return E * (f * p.mean(0)).sum(), f

def forward_backward(params, bias, h, y, alpha):
  """The MoE layer's output y_hat = sum_s g_s W_{i_s} h, the loss 1/2 mean ||y_hat - y||^2 + alpha * LB, and the
  gradients of the loss with respect to the router and the experts."""
  W_r, W = params
  p, i, g = route(h, W_r, bias)
  yk = np.einsum("nkod,nd->nko", W[i], h)                                   # (N, k, D) each chosen expert's output
  r = ((g[..., None] * yk).sum(1) - y) / N                                  # (N, D) d(MSE)/d(y_hat)
  lb, f = lb_loss(p, i)
  loss = 0.5 * N * (r ** 2).sum() + alpha * lb
  dW = np.zeros_like(W)
  np.add.at(dW, i, g[..., None, None] * r[:, None, :, None] * h[:, None, None, :])
  dp = np.zeros_like(p)
  np.put_along_axis(dp, i, (r[:, None, :] * yk).sum(-1), 1)                # through the gates g = p[i]
  dp += alpha * E * f / N                                                  # through P (f is piecewise constant)
  dz = p * (dp - (dp * p).sum(-1, keepdims=True))                          # the softmax's backward
  return loss, (dz.T @ h, dW), i

def train(alpha=0.0, gamma=0.0, steps=300, lr=1e-2, seed=0):
  """Adam on the loss; with gamma > 0 the bias moves after every step: b_e += gamma * sign(mean load - load_e).
  Returns the load per expert averaged over the last 20 steps, and the MSE on a fresh batch."""
  rng = np.random.default_rng(seed)
  centres, maps, mean = rng.normal(size=(CLUSTERS, D)), rng.normal(size=(CLUSTERS, D, D)) / np.sqrt(D), rng.normal(size=D)
  params = [rng.normal(size=(E, D)) * 0.1, rng.normal(size=(E, D, D)) * 0.1]
  m, v, bias, loads = [np.zeros_like(q) for q in params], [np.zeros_like(q) for q in params], np.zeros(E), []
  for t in range(1, steps + 1):
    h, y = data(rng, centres, maps, mean)
    _, grads, i = forward_backward(params, bias, h, y, alpha)
    for q, gr, m_, v_ in zip(params, grads, m, v):
      m_ += 0.1 * (gr - m_); v_ += 0.001 * (gr ** 2 - v_)
      q -= lr * (m_ / (1 - 0.9 ** t)) / (np.sqrt(v_ / (1 - 0.999 ** t)) + 1e-8)
    load = np.bincount(i.ravel(), minlength=E) / (N * k)
    bias += gamma * np.sign(load.mean() - load)
    loads.append(load)
  h, y = data(rng, centres, maps, mean)
  _, i, g = route(h, params[0], bias)
  mse = (((g[..., None] * np.einsum("nkod,nd->nko", params[1][i], h)).sum(1) - y) ** 2).sum(-1).mean()
  return np.mean(loads[-20:], 0), mse

# %% [markdown]
# ## Check the pieces against olmoe.py before trusting the experiment

# %%
rng = np.random.default_rng(1)
h, y = rng.normal(size=(N, D)) + 1, rng.normal(size=(N, D))
params = [rng.normal(size=(E, D)), rng.normal(size=(E, D, D)) * 0.3]
bias = rng.normal(size=E) * 0.05
# routing: olmoe.route with the same bias picks the same experts with the same weights
p, i, g = route(h, params[0], bias)
_, g_ref, i_ref = olmoe.route(Tensor(h.astype(np.float32)), Tensor(params[0].astype(np.float32)), k,
                              bias=Tensor(bias.astype(np.float32)))
assert (i == i_ref.numpy()).all() and np.allclose(g, g_ref.numpy(), atol=1e-5)
# the load-balancing loss: olmoe.load_balancing_loss in OLMoE's (MegaBlocks') convention
z = Tensor((h @ params[0].T).astype(np.float32))
assert np.isclose(lb_loss(*route(h, params[0], 0 * bias)[:2])[0], olmoe.load_balancing_loss([z], E, k).item(), rtol=1e-5)
# the gradients: central differences of the loss (the routing stays fixed for small steps)
loss, grads, _ = forward_backward(params, bias, h, y, alpha=0.5)
for which, idx in ((0, (3, 5)), (1, (i[0, 0], 2, 7))):
  shifted = [q.copy() for q in params]
  shifted[which][idx] += 1e-6
  up = forward_backward(shifted, bias, h, y, 0.5)[0]
  shifted[which][idx] -= 2e-6
  down = forward_backward(shifted, bias, h, y, 0.5)[0]
  assert np.isclose((up - down) / 2e-6, grads[which][idx], rtol=1e-4, atol=1e-8)
# the bias update: olmoe.update_router_bias on a one-layer model with the same routing and rate
gamma = 0.01
model = olmoe.Olmoe(olmoe.OlmoeConfig(vocab_size=8, hidden_size=D, intermediate_size=4, num_hidden_layers=1,
                                      num_attention_heads=1, num_experts=E, num_experts_per_tok=k, router_bias_rate=gamma))
olmoe.update_router_bias(model, olmoe.Routing([z], [Tensor(g.astype(np.float32))], [Tensor(i.astype(np.int32))]))
load = np.bincount(i.ravel(), minlength=E) / (N * k)
assert np.allclose(model.layers[0].mlp.expert_bias.numpy(), gamma * np.sign(load.mean() - load))
print("routing, load-balancing loss, gradients and bias update agree with olmoe.py")

# %% [markdown]
# ## The experiment: the same seed, data and steps, three ways of balancing

# %%
runs = {"no balancing": train(), "LB loss, alpha = 1": train(alpha=1.0), "bias, gamma = 0.01": train(gamma=0.01),
        "LB loss, alpha = 0.01": train(alpha=0.01)}
print("load per expert over the uniform share (1 = balanced), mean of the last 20 steps; MSE on a fresh batch")
for name, (load, mse) in runs.items():
  print(f"{name:22s}" + " ".join(f"{x:4.2f}" for x in load * E) +
        f"   unused {int((load * E < 0.05).sum())}, busiest {load.max() * E:.2f}, MSE {mse:.3f}")

# %%
# what the answers on the page say: without balancing, some experts are left idle and the fit is worst
collapsed, lb, biased, weak = runs.values()
assert (collapsed[0] * E < 0.05).sum() >= 2 and (weak[0] * E < 0.05).sum() >= 2   # OLMoE's alpha is too weak here
assert all((r[0] * E > 0.2).all() and r[1] < collapsed[1] for r in (lb, biased))
