# A mixture of experts with one expert is the dense SwiGLU FFN; copying that FFN into E experts does not give it back.
import numpy as np
from dataclasses import replace
from tinygrad import Tensor
import olmoe

Tensor.manual_seed(0)
D, I = 8, 16
x = Tensor.randn(1, 3, D)                                          # (B=1, T=3, D) three tokens
W_gate, W_up, W_down = Tensor.randn(I, D), Tensor.randn(I, D), Tensor.randn(D, I)

def swiglu(x):                                                     # the dense FFN: W_down (silu(W_gate x) * W_up x)
  return (x @ W_gate.T).silu().mul(x @ W_up.T) @ W_down.T

def moe_with_copies(E, k):
  """An OLMoE block whose E experts are all copies of the dense FFN, with a random router."""
  cfg = olmoe.OlmoeConfig(hidden_size=D, intermediate_size=I, num_experts=E, num_experts_per_tok=k)
  block = olmoe.SparseMoeBlock(cfg)
  block.experts_gate_up_proj = W_gate.cat(W_up).unsqueeze(0).repeat(E, 1, 1)   # (E, 2I, D) fused [gate; up]
  block.experts_down_proj = W_down.unsqueeze(0).repeat(E, 1, 1)                # (E, D, I)
  return block

dense = swiglu(x)
one, (z, g, i) = moe_with_copies(E=1, k=1)(x)
print("E=1, k=1: max |MoE - dense|      ", f"{(one - dense).abs().max().item():.1e}", " g =", g.numpy().ravel())
four, (z, g, i) = moe_with_copies(E=4, k=2)(x)
ratio = (four / dense).numpy()[0, :, 0]
print("E=4, k=2 copies: MoE / dense     ", np.round(ratio, 4), " per token")
print("               sum of the k g_i  ", np.round(g.sum(-1).numpy(), 4))
