# The same load-balancing loss, E * sum_e f_e P_e (olmoe.load_balancing_loss, one
# layer, k = 1), averaged at three levels over one batch of four sequences of four
# tokens: two "math" sequences use experts 0 and 1, two "code" sequences experts 2
# and 3, and each micro-batch holds one domain.
import numpy as np
from tinygrad import Tensor
import olmoe

E, k = 4, 1
chosen = {"math 1": [0, 0, 0, 1], "math 2": [1, 1, 1, 0],
          "code 1": [2, 2, 2, 3], "code 2": [3, 3, 3, 2]}
logits = {s: np.eye(E, dtype=np.float32)[e] * 6.0   # (4, E): 6 on the chosen expert
          for s, e in chosen.items()}

def lb(names):
  """The loss on the tokens of these sequences taken together: f and P over them."""
  z = np.concatenate([logits[s] for s in names])
  return olmoe.load_balancing_loss([Tensor(z)], E, k).item()

seqs = list(chosen)
levels = {
  "global batch (all 16 tokens)": lb(seqs),
  "micro-batch (per domain, averaged)": np.mean([lb(seqs[:2]), lb(seqs[2:])]),
  "sequence-wise (per sequence, averaged)": np.mean([lb([s]) for s in seqs]),
}
for name, v in levels.items(): print(f"{name:40s} {v:.3f}")
# numpy: with P close to f, E * sum f^2 per group of tokens
f = lambda ids: np.bincount(ids, minlength=E) / len(ids)
groups = (seqs, seqs[:2], seqs[:1])
print("by hand, E sum f^2 (P = f):",
      [round(float(E * (f(np.concatenate([chosen[s] for s in g])) ** 2).sum()), 3) for g in groups])
