# Pooled (transformers) against per-layer (OLMoE, MegaBlocks) load balancing, both
# through olmoe.load_balancing_loss: a routing only the per-layer form sees, and how
# alpha transfers between the two.
import numpy as np
from tinygrad import Tensor
import olmoe

E, k, N = 8, 2, 8

def half_routing(layer):
  """Router logits of a layer whose N tokens use one half of the experts (layer 0:
  experts 0-3, layer 1: experts 4-7), evenly: token n prefers experts n and n+1 (mod 4)
  of its half."""
  z = np.full((N, E), -3.0, np.float32)        # little probability on the other half
  for n in range(N):
    z[n, 4 * layer: 4 * layer + 4] = 0.0
    z[n, 4 * layer + n % 4] = z[n, 4 * layer + (n + 1) % 4] = 1.0
  return z

def lb_and_grad(logits, convention):
  zs = [Tensor(z) for z in logits]
  for z in zs: z.requires_grad = True
  lb = olmoe.load_balancing_loss(zs, E, k, convention=convention)
  lb.backward()
  return lb.item(), np.stack([z.grad.numpy() for z in zs])

halves = [half_routing(0), half_routing(1)]
print("two layers, each on a different half of the experts (E = 8, k = 2):")
for conv, balanced in (("transformers", k), ("olmoe", 1)):
  lb, grad = lb_and_grad(halves, conv)
  print(f"  {conv:12s}  LB = {lb:.4f}  (balanced value {balanced})"
        f"   |d LB / d z| = {np.abs(grad).max():.1e}")

# alpha. One layer, any routing: the pooled value is k times the per-layer one,
# and so is its gradient
rng = np.random.default_rng(0)
one = [rng.normal(size=(N, E)).astype(np.float32) * 2]
(t, gt), (o, go) = lb_and_grad(one, "transformers"), lb_and_grad(one, "olmoe")
print(f"one layer, random logits:  transformers {t:.4f} = k x olmoe {k * o:.4f};")
print(f"  max |0.01/k grad_t - 0.01 grad_o| = {np.abs(0.01 / k * gt - 0.01 * go).max():.1e}")
# several layers: uniform routing gives k and 1; layers that route differently,
# no exact factor
uniform = [np.zeros((N, E), np.float32) + np.arange(E, dtype=np.float32) * 1e-4 * (n % 2)
           for n in range(3)]
(t, _), (o, _) = lb_and_grad(uniform, "transformers"), lb_and_grad(uniform, "olmoe")
print(f"three layers, near-uniform routing:  transformers {t:.4f}, olmoe {o:.4f},"
      f" ratio {t / o:.4f}")
three = [rng.normal(size=(N, E)).astype(np.float32) * 2 for _ in range(3)]
(t, gt), (o, go) = lb_and_grad(three, "transformers"), lb_and_grad(three, "olmoe")
cos = (gt * go).sum() / np.sqrt((gt * gt).sum() * (go * go).sum())
print(f"three layers, random logits:  transformers {t:.4f}, olmoe {o:.4f}, ratio {t / o:.4f};")
print(f"  gradients: |grad_t| / (k |grad_o|) = {np.linalg.norm(gt) / (k * np.linalg.norm(go)):.3f},"
      f" cosine {cos:.3f}")
