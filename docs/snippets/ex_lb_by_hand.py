# Exercise 1, solution: f, P and the load-balancing loss by hand, for two
# layers and a left-padded batch.
import numpy as np
from tinygrad import Tensor
import olmoe

rng = np.random.default_rng(0)
L, B, T, E, k = 2, 2, 5, 8, 2
logits = [rng.normal(size=(B * T, E)).astype(np.float32) for _ in range(L)]  # (N, E)
mask = np.array([[1, 1, 1, 1, 1],
                 [0, 0, 1, 1, 1]])                  # row 1: two padding positions

def softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)

real = mask.reshape(-1).astype(bool)                # (N,) the real tokens
p = np.concatenate([softmax(z)[real] for z in logits])   # (L * 8, E) all layers
top = np.argsort(-p, axis=-1, kind="stable")[:, :k]      # (L * 8, k)
f = np.bincount(top.ravel(), minlength=E) / len(p)       # sums to k
P = p.mean(0)                                            # sums to 1
lb = E * (f * P).sum()
ours = olmoe.load_balancing_loss([Tensor(z) for z in logits], E, k, Tensor(mask), "transformers").item()

np.set_printoptions(precision=3, suppress=True)
print("f =", f, "  sum", f.sum())
print("P =", P, "  sum", P.sum().round(6))
print(f"by hand {lb:.6f}   olmoe.load_balancing_loss {ours:.6f}")
assert abs(lb - ours) < 1e-5
