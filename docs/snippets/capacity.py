# What a capacity limit drops: token-choice routing from olmoe.route(), then a per-expert capacity applied on top.
import math
import numpy as np
from tinygrad import Tensor
import olmoe

N, D, E, k = 32, 16, 8, 2
rng = np.random.default_rng(0)
h = rng.normal(size=(N, D)).astype(np.float32)                    # (N, D) a batch of hidden states
W_r = rng.normal(size=(E, D)).astype(np.float32)                  # (E, D) router
W_r[0] += 2 * h.mean(0) / np.linalg.norm(h.mean(0))               # expert 0 is popular, as real routers have favourites
z, g, i = (t.numpy() for t in olmoe.route(Tensor(h), Tensor(W_r), k))   # dropless token choice: (N, E), (N, k), (N, k)

def keep_within_capacity(i, E, capacity):
  """(N, k) bool: which (token, slot) assignments fit. First choices claim places before second choices,
  earlier tokens before later ones (the order of GShard and Switch Transformer); the rest are dropped."""
  keep, load = np.zeros(i.shape, bool), np.zeros(E, int)
  for s in range(i.shape[1]):
    for n in range(i.shape[0]):
      if load[i[n, s]] < capacity: keep[n, s], load[i[n, s]] = True, load[i[n, s]] + 1
  return keep

print("tokens per expert (dropless):", np.bincount(i.ravel(), minlength=E), f"  even share N*k/E = {N * k // E}")
print("capacity factor  capacity  assignments dropped  tokens left with no expert  router weight dropped")
for cf in (0.5, 1.0, 1.25, 2.0, E / k):
  capacity = math.ceil(cf * N * k / E)
  keep = keep_within_capacity(i, E, capacity)
  print(f"{cf:15.2f}  {capacity:8d}  {(~keep).sum():7d} of {keep.size} ({(~keep).mean():4.0%})  "
        f"{(~keep).all(1).sum():26d}  {g[~keep].sum() / g.sum():21.1%}")

# the same token, routed in two batches: with a capacity its fate depends on which other tokens came first
capacity = math.ceil(1.0 * N * k / E)
alone = keep_within_capacity(i[-1:], E, capacity)[0]
in_batch = keep_within_capacity(i, E, capacity)[-1]
print(f"last token's experts {i[-1]}: kept {alone} when routed alone, {in_batch} after the other {N - 1} tokens")

# expert choice: each expert takes its `capacity` most probable tokens, so every expert is full by construction,
# but a token may get any number of experts, and the choice needs the whole batch (future tokens included)
p = np.exp(z - z.max(-1, keepdims=True)); p /= p.sum(-1, keepdims=True)
chosen = np.argsort(-p, axis=0, kind="stable")[:capacity]          # (capacity, E) token ids per expert
experts_per_token = np.bincount(chosen.ravel(), minlength=N)
print("expert choice, capacity", capacity, "- tokens that got 0, 1, 2, ... experts:",
      np.bincount(experts_per_token, minlength=E + 1)[:E + 1])
