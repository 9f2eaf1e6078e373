# Exercise 3, solution: a capacity factor for olmoe.py's MoE block, and what it
# costs the block's output.
import math
import numpy as np
from tinygrad import Tensor
import olmoe

def moe_with_capacity(block, x, capacity_factor):
  """The block's output when each expert takes at most ceil(cf * N * k / E)
  (token, slot) assignments; also returns the share of assignments dropped
  and the share of router weight they carried."""
  cfg = block.cfg
  B, T, D = x.shape
  N, E, k = B * T, cfg.num_experts, cfg.num_experts_per_tok
  h = x.reshape(N, D)
  z, g, i = olmoe.route(h, block.gate, k, cfg.norm_topk_prob)   # the block's router
  capacity = math.ceil(capacity_factor * N * k / E)
  idx, keep, load = i.numpy(), np.zeros((N, k), np.float32), np.zeros(E, int)
  for s in range(k):                          # first choices first, then by position
    for n in range(N):
      if load[idx[n, s]] < capacity:
        keep[n, s], load[idx[n, s]] = 1.0, load[idx[n, s]] + 1
  x = h.unsqueeze(1).expand(N, k, D).reshape(N * k, D)  # one row per (token, slot)
  y = olmoe.expert_ffn(x, i.reshape(N * k), block.experts.gate_up_proj,
                       block.experts.down_proj).reshape(N, k, D)   # (N, k, D)
  y = (y * (g * Tensor(keep)).unsqueeze(-1)).sum(1)                 # dropped: weight 0
  gn = g.numpy()
  return y.reshape(B, T, D), 1 - keep.mean(), (gn * (1 - keep)).sum() / gn.sum()

rng = np.random.default_rng(0)
def randn(*shape, scale=1.0):
  return Tensor((rng.normal(size=shape) * scale).astype(np.float32))
cfg = olmoe.OlmoeConfig(hidden_size=16, intermediate_size=32,
                        num_experts=8, num_experts_per_tok=2)
block = olmoe.SparseMoeBlock(cfg)
block.gate = randn(8, 16) + Tensor.eye(8, 16) * 2       # random router rows: with
# every input shifted by +0.5 (below), each expert's mean logit is its row's sum
# times 0.5, so a few experts become favourites of most tokens
block.experts.gate_up_proj = randn(8, 64, 16, scale=0.3)
block.experts.down_proj = randn(8, 16, 32, scale=0.3)
x = randn(4, 16, 16) + 0.5                              # 64 tokens
dropless, _ = block(x)
for cf in (0.5, 1.0, 1.25, 2.0, cfg.num_experts / cfg.num_experts_per_tok):
  y, dropped, weight = moe_with_capacity(block, x, cf)
  change = ((y - dropless).square().sum() / dropless.square().sum()).sqrt().item()
  print(f"capacity factor {cf:4.2f}: {dropped:4.0%} of assignments dropped,",
        f"{weight:4.0%} of router weight, relative change of the output {change:.3f}")
# with capacity factor E/k the capacity is N: nothing is dropped
assert np.allclose(y.numpy(), dropless.numpy(), atol=1e-5)
