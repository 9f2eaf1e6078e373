# What a capacity limit drops: token-choice routing by olmoe.route(), then a
# capacity per expert applied on top.
import math
import numpy as np
from tinygrad import Tensor
import olmoe

N, D, E, k = 32, 16, 8, 2
rng = np.random.default_rng(0)
h = rng.normal(size=(N, D)).astype(np.float32)     # (N, D) a batch of hidden states
W_r = rng.normal(size=(E, D)).astype(np.float32)   # (E, D) the router
W_r[0] += 2 * h.mean(0) / np.linalg.norm(h.mean(0))   # expert 0 is a favourite
z, g, i = (t.numpy() for t in olmoe.route(Tensor(h), Tensor(W_r), k))  # dropless

def keep_within_capacity(i, E, capacity):
  """(N, k) bool: the (token, slot) assignments that fit. First choices claim
  places before second choices, earlier tokens before later ones (GShard and
  Switch Transformer's order); the rest are dropped."""
  keep, load = np.zeros(i.shape, bool), np.zeros(E, int)
  for s in range(i.shape[1]):
    for n in range(i.shape[0]):
      if load[i[n, s]] < capacity:
        keep[n, s], load[i[n, s]] = True, load[i[n, s]] + 1
  return keep

print("tokens per expert, dropless:", np.bincount(i.ravel(), minlength=E),
      f"  (even share N*k/E = {N * k // E})")
print("factor  capacity  assignments dropped  tokens with no expert  weight dropped")
for cf in (0.5, 1.0, 1.25, 2.0, E / k):
  capacity = math.ceil(cf * N * k / E)
  drop = ~keep_within_capacity(i, E, capacity)
  print(f"{cf:6.2f}  {capacity:8d}  {drop.sum():7d} of {drop.size} ({drop.mean():4.0%})"
        f"  {drop.all(1).sum():21d}  {g[drop].sum() / g.sum():14.1%}")

# one token, two batches: with a capacity its fate depends on the tokens before it
capacity = math.ceil(1.0 * N * k / E)
alone = keep_within_capacity(i[-1:], E, capacity)[0]
in_batch = keep_within_capacity(i, E, capacity)[-1]
print(f"last token's experts {i[-1]}:  kept {alone} when routed alone")
print(f"{'':28s}kept {in_batch} after the other {N - 1} tokens")

# expert choice: each expert takes its `capacity` most probable tokens
p = np.exp(z - z.max(-1, keepdims=True))
p /= p.sum(-1, keepdims=True)
chosen = np.argsort(-p, axis=0, kind="stable")[:capacity]    # (capacity, E) token ids
per_token = np.bincount(np.bincount(chosen.ravel(), minlength=N), minlength=E + 1)
print(f"expert choice, capacity {capacity}: tokens with 0, 1, 2, ... experts:", per_token)
