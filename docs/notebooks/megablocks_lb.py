# %% [markdown]
# # Build it 4: MegaBlocks' load-balancing loss from its definition
#
# OLMoE was trained with MegaBlocks' `batched_load_balancing_loss`. Write it in numpy from its definition, check it
# against `olmoe.load_balancing_loss(..., convention="olmoe")`, and find a routing that the pooled form transformers
# reports calls balanced while every layer has collapsed. The question and the written answers are on the course
# page "Build it" (docs/build.md).

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

def megablocks_lb(router_logits: list[np.ndarray], k: int) -> float:
  """MegaBlocks' batched_load_balancing_loss with weight 1. Each layer l saves tokens_per_expert[l] (E,), how many of
  its N tokens chose each expert among their top k, and expert_scores[l] (N, E), the router probabilities. Then:
  scores = the per-layer probabilities side by side, averaged over the tokens -> (L E,); counts = the per-layer counts
  side by side -> (L E,); loss = E / (L N k) * dot(counts, scores)."""
  L, (N, E) = len(router_logits), router_logits[0].shape
  probs = [np.exp(z - z.max(-1, keepdims=True)) / np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)
           for z in router_logits]
  counts = [np.bincount(np.argsort(-p, -1, kind="stable")[:, :k].ravel(), minlength=E) for p in probs]
  scores = np.concatenate(probs, axis=1).mean(0)                            # (L E,)
  return E / (L * N * k) * np.dot(np.concatenate(counts), scores)

def pooled_lb(router_logits: list[np.ndarray], k: int) -> float:
  """transformers' OlmoeForCausalLM aux_loss: f (summing to k) and P pooled over every layer's tokens, then E sum f P."""
  z = np.concatenate(router_logits)                                         # (L N, E) every layer's rows as tokens
  p = np.exp(z - z.max(-1, keepdims=True)); p /= p.sum(-1, keepdims=True)
  f = np.bincount(np.argsort(-p, -1, kind="stable")[:, :k].ravel(), minlength=z.shape[1]) / len(z)
  return z.shape[1] * (f * p.mean(0)).sum()

# %% [markdown]
# ## Against olmoe.py, on random router logits

# %%
rng = np.random.default_rng(0)
for L, N, E, k in ((1, 64, 8, 2), (3, 40, 16, 4), (4, 128, 64, 8)):
  z = [rng.normal(size=(N, E)).astype(np.float32) * 2 for _ in range(L)]
  ours = megablocks_lb(z, k)
  ref = olmoe.load_balancing_loss([Tensor(x) for x in z], E, k, convention="olmoe").item()
  ref_pooled = olmoe.load_balancing_loss([Tensor(x) for x in z], E, k, convention="transformers").item()
  assert np.isclose(ours, ref, rtol=1e-5) and np.isclose(pooled_lb(z, k), ref_pooled, rtol=1e-5)
  assert np.isclose(ours, ref_pooled / k, rtol=1e-5) == (L == 1)   # the forms agree up to k only for one layer
  print(f"L = {L}, N = {N:3d}, E = {E:2d}, k = {k}: MegaBlocks {ours:.4f} = olmoe.py {ref:.4f};"
        f"  pooled {ref_pooled:.4f} (divided by k: {ref_pooled / k:.4f})")

# %% [markdown]
# ## A routing only the per-layer form catches
#
# OLMoE-1B-7B's shape: 16 layers, E = 64, k = 8. In layer l every token puts its probability on the 8 experts
# 8 (l mod 8) ... 8 (l mod 8) + 7 and none elsewhere: each layer uses 8 of its 64 experts, a collapse.

# %%
L, N, E, k = 16, 256, 64, 8
collapsed = []
for l in range(L):
  z = np.full((N, E), -30.0, np.float32)                   # e^-30: no probability outside the layer's 8 experts
  z[:, 8 * (l % 8): 8 * (l % 8) + 8] = rng.normal(size=(N, 8)) * 0.1
  collapsed.append(z)
per_layer, pooled = megablocks_lb(collapsed, k), pooled_lb(collapsed, k)
print(f"each layer on 8 of 64 experts: per-layer (MegaBlocks, OLMoE) {per_layer:.3f}, balanced value 1;"
      f"  pooled (transformers) {pooled:.3f}, balanced value k = {k}")
uniform = [rng.normal(size=(N, E)).astype(np.float32) * 1e-3 for _ in range(L)]
print(f"near-uniform routing: per-layer {megablocks_lb(uniform, k):.3f}, pooled {pooled_lb(uniform, k):.3f}")

# %%
# what the answers on the page say: the per-layer form sees the collapse (E / k times the balanced value), the pooled
# form scores it exactly as balanced, because every expert is used by some layer
assert np.isclose(per_layer, E / k, rtol=1e-3) and np.isclose(pooled, k, rtol=1e-3)
