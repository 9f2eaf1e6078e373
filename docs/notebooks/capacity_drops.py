# %% [markdown]
# # Build it 1: capacity factors on a trained model's routing
#
# Implement the capacity limit of GShard and Switch Transformer (each expert takes at most
# C = ceil(c N k / E) (token, slot) pairs, first choices before second choices, earlier tokens first), check it
# against `olmoe.capacity_keep`, and measure what it drops on the routing of the bundled OLMoE demo. The question
# and the written answers are on the course page "Build it" (docs/build.md).

# %%
# The models and samples are found from the repository root, wherever the notebook runs inside the checkout.
import os, sys
from pathlib import Path
ROOT = next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "models" / "olmoe-demo").is_dir())
os.chdir(ROOT); sys.path.insert(0, str(ROOT))
import olmoe_compiler; olmoe_compiler.use_cpu_target()   # a CPU compile target clang can finish (bf16)

# %%
import math
import numpy as np
from tinygrad import Tensor
import olmoe

model, tok = olmoe.load("models/olmoe-demo", progress=False)
E, k = model.cfg.num_experts, model.cfg.num_experts_per_tok
DOMAINS = ("prose", "code", "math")
T = 256                                               # tokens of each domain's held-out sample
ids = np.array([tok.encode(Path(f"demo/samples/{d}.txt").read_text())[:T] for d in DOMAINS], dtype=np.int32)
_, routing = model(Tensor(ids), return_routing=True)
experts = np.stack([i.numpy() for i in routing.experts])          # (L, 3T, k) each layer's top-k, slot 0 first
weights = np.stack([g.float().numpy() for g in routing.weights])  # (L, 3T, k) their gate values
L = len(experts)

# %%
def keep_within_capacity(i: np.ndarray, capacity: int) -> np.ndarray:
  """(N, k) bool: the (token, slot) pairs that fit when each expert takes at most `capacity` of them. The pairs
  queue slot-major (every first choice, then every second choice), in token order within a slot; a pair fits when
  fewer than `capacity` pairs of its expert are ahead of it."""
  N, k = i.shape
  queue = i.T.ravel()                                            # (k N,) slot-major
  onehot = queue[:, None] == np.arange(E)                        # (k N, E)
  place = (np.cumsum(onehot, 0) * onehot).sum(1)                 # 1-based place in its expert's queue
  return (place <= capacity).reshape(k, N).T

# olmoe.py's capacity_keep (the model's own, tested against GShard's order) is the reference
for l in range(L):
  for c in (0.5, 1.0, 1.25):
    C = math.ceil(c * experts.shape[1] * k / E)
    assert (keep_within_capacity(experts[l], C) == olmoe.capacity_keep(Tensor(experts[l]), E, C).numpy()).all()

# %%
def drops(i: np.ndarray, g: np.ndarray, c: float) -> tuple[float, float, float, float]:
  """For one layer's routing of a batch: the share of (token, slot) pairs dropped, the share of first choices among
  them, the share of tokens that lose every expert, and the share of the router weight the dropped pairs carried."""
  keep = keep_within_capacity(i, math.ceil(c * len(i) * k / E))
  dropped = ~keep
  first = dropped[:, 0].sum() / max(dropped.sum(), 1)
  return dropped.mean(), first, dropped.all(1).mean(), g[dropped].sum() / g.sum()

FACTORS = (1.0, 1.25, 2.0)
batches = {"mixed batch (all three domains)": slice(None)} | {f"{d} alone": slice(n * T, (n + 1) * T)
                                                              for n, d in enumerate(DOMAINS)}
table = {}
print("share of (token, slot) pairs dropped, mean over the layers (in brackets: the worst layer)")
print(f"{'batch':32s}" + "".join(f"{'c = ' + str(c):>16s}" for c in FACTORS))
for name, rows in batches.items():
  table[name] = np.array([[drops(experts[l, rows], weights[l, rows], c) for c in FACTORS] for l in range(L)])  # (L, 3, 4)
  print(f"{name:32s}" + "".join(f"{m:9.1%} ({w:4.0%})" for m, w in zip(table[name][:, :, 0].mean(0), table[name][:, :, 0].max(0))))

mixed = table["mixed batch (all three domains)"]
print("\nmixed batch, mean over the layers:")
print(f"{'c':>5s} {'pairs dropped':>14s} {'first choices among them':>25s} {'tokens with no expert':>22s} {'router weight dropped':>22s}")
for n, c in enumerate(FACTORS):
  d, first, none, w = mixed[:, n].mean(0)
  print(f"{c:5.2f} {d:14.1%} {first:25.1%} {none:22.1%} {w:22.1%}")
busiest = max(np.bincount(experts[l].ravel(), minlength=E).max() for l in range(L))
print(f"\nthe busiest expert of any layer takes {busiest} pairs: nothing is dropped from "
      f"c = {busiest * E / (experts.shape[1] * k):.2f} on")

# %%
# what the answers on the page say
single = np.mean([table[f"{d} alone"][:, :, 0].mean(0) for d in DOMAINS], 0)   # (3,) mean over domains and layers
assert (single > mixed[:, :, 0].mean(0)).all()       # one-domain batches drop more than the mixed batch
assert (mixed[:, :, 3].mean(0) < mixed[:, :, 0].mean(0)).all()   # dropped pairs carry less than their share of weight
assert (np.diff(mixed[:, :, 0].mean(0)) < 0).all()   # more capacity, fewer drops
assert (mixed[:, :, 1].mean(0) < 0.5).all()         # most dropped pairs are second choices
assert busiest * E / (experts.shape[1] * k) > 2      # some expert takes more than twice its even share
