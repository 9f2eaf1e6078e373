# Which experts a decode step touches, on the bundled demo model (L = 4 layers of
# E = 16 experts, k = 2): generation with with_routing=True returns each new
# token's expert ids per layer.
# requires: models/olmoe-demo/config.json
from pathlib import Path
import numpy as np
from tinygrad import Tensor
import olmoe

model, tok = olmoe.load("models/olmoe-demo", progress=False)
c = model.cfg
L, E, k = c.num_hidden_layers, c.num_experts, c.num_experts_per_tok
prompts = ["The mixture of experts", "def add(a, b):", "12 + 30 =", "The tokenizer"]
steps = olmoe.generate(model, [tok.encode(prompts[0])], 64, with_routing=True)
ids = np.stack([s.experts[:, 0] for s in steps])   # (T, L, k) one sequence
T = len(ids)
print(f"batch 1, {T} decode steps: each step touches {k} of {E} experts in each of",
      f"{L} layers")
seen = [len(np.unique(ids[:, l])) for l in range(L)]
print("distinct experts over the whole generation, per layer:", seen)
again = np.mean([len(set(ids[t, l]) & set(ids[t - 1, l]))
                 for t in range(1, T) for l in range(L)])
print(f"experts shared with the previous token: {again:.2f} of {k}",
      f"(uniform routing: {k * k / E:.2f})")

def lru_hits(seq, size):
  """Share of expert uses found in an LRU cache of `size` experts of a layer."""
  cache, hits, uses = [], 0, 0
  for chosen in seq:
    for e in chosen:
      uses += 1
      if e in cache: hits += 1; cache.remove(e)
      cache.append(e)
      if len(cache) > size: cache.pop(0)
  return hits / uses
for size in (2, 4, 8):
  share = np.mean([lru_hits(ids[:, l], size) for l in range(L)])
  print(f"an LRU cache of {size} experts per layer serves {share:.0%} of the uses")

B = len(prompts)
batch = olmoe.generate(model, [tok.encode(p) for p in prompts], 16, with_routing=True)
touched = np.mean([len(np.unique(s.experts[l])) for s in batch for l in range(L)])
print(f"batch {B}: a step touches {touched:.1f} distinct experts per layer",
      f"(uniform routing: {E * (1 - (1 - k / E) ** B):.1f})")

# expert parallelism on the same model: the 16 experts over 4 devices (4 each);
# a layer waits for the device with the most (token, expert) pairs
G = 4
texts = [Path(f"demo/samples/{d}.txt").read_text() for d in ("prose", "code", "math")]
x = np.array([tok.encode(t)[:128] for t in texts], dtype=np.int32)   # (3, 128)
_, routing = model(Tensor(x), return_routing=True)
busiest = []
for l in range(L):
  device = routing.experts[l].numpy().ravel() // (E // G)
  per_device = np.bincount(device, minlength=G)
  busiest.append(per_device.max() / per_device.mean())
print(f"{x.size} prompt tokens on {G} devices: the busiest device holds",
      " ".join(f"{b:.2f}x" for b in busiest))
print("  the mean load, per layer")
