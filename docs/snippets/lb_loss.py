# The load-balancing loss by hand (numpy) next to olmoe.load_balancing_loss.
import numpy as np
from tinygrad import Tensor
import olmoe

def softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)

def by_hand(z, k):
  N, E = z.shape
  p = softmax(z)                                       # (N, E) probabilities
  top = np.argsort(-p, axis=-1, kind="stable")[:, :k]  # (N, k) chosen experts
  f = np.bincount(top.ravel(), minlength=E) / N        # tokens per expert: sums to k
  P = p.mean(0)                                        # mean probability: sums to 1
  return f, P, E * (f * P).sum()

E, k = 4, 2
routings = {   # router logits (N=4 tokens, E=4)
  "balanced": np.array([np.roll([2.0, 2.0, 0.0, 0.0], n) for n in range(4)]),
  "collapsed": np.tile([8.0, 8.0, 0.0, 0.0], (4, 1)),
  "skewed": np.array([[3.0, 1.0, 0.0, 0.0], [2.0, 0.0, 1.0, 0.0],
                      [1.0, 0.0, 0.0, 2.0], [1.5, 1.0, 0.0, 0.0]]),
}
np.set_printoptions(precision=3, suppress=True)
for name, z in routings.items():
  f, P, lb = by_hand(z, k)
  ours = olmoe.load_balancing_loss([Tensor(z.astype(np.float32))], E, k, convention="transformers").item()
  print(f"{name:9s}  f = {f}  P = {P}")
  print(f"{'':9s}  E*sum(f*P) = {lb:.4f}   olmoe: {ours:.4f}   /k: {lb / k:.4f}")

# below 1 (E = 2, k = 1): three tokens barely prefer expert 0, one is sure of expert 1
z = np.array([[0.04, 0.0], [0.04, 0.0], [0.04, 0.0], [0.0, 9.0]])
f, P, lb = by_hand(z, 1)
print(f"below 1    f = {f}  P = {P}  E*sum(f*P) = {lb:.4f}")

# the gradient: only P carries one (f comes from a top-k), and
# dLB/dz[n, j] = (E/N) p[n, j] (f_j - sum_e f_e p[n, e])
z = Tensor(routings["skewed"].astype(np.float32))
z.requires_grad = True
olmoe.load_balancing_loss([z], E, k, convention="transformers").backward()
f, P, _ = by_hand(routings["skewed"], k)
p = softmax(routings["skewed"])
formula = E / len(p) * p * (f - (p * f).sum(-1, keepdims=True))
print("d LB / d z, token 0:  autograd", z.grad.numpy()[0], " formula", formula[0])

# the router z-loss: mean over tokens of logsumexp(z)^2
for name in ("balanced", "collapsed"):
  z = routings[name]
  lse = z.max(-1) + np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1))
  ours = olmoe.router_z_loss([Tensor(z.astype(np.float32))]).item()
  print(f"z-loss, {name:9s}  by hand {np.mean(lse ** 2):.4f}   olmoe: {ours:.4f}")
