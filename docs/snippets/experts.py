# A mixture of experts with one expert is the dense SwiGLU FFN;
# E copies of that FFN do not give it back.
import numpy as np
from tinygrad import Tensor
import olmoe

rng = np.random.default_rng(0)
def randn(*shape): return Tensor(rng.normal(size=shape).astype(np.float32))

D, I = 8, 16
x = randn(1, 3, D)                       # (B=1, T=3, D): three tokens
W_gate, W_up, W_down = randn(I, D), randn(I, D), randn(D, I)

def swiglu(x):                           # the dense FFN
  return ((x @ W_gate.T).silu() * (x @ W_up.T)) @ W_down.T

def moe_of_copies(E, k):
  """An OLMoE block whose E experts are copies of the FFN, with a random router."""
  cfg = olmoe.OlmoeConfig(hidden_size=D, intermediate_size=I,
                          num_experts=E, num_experts_per_tok=k)
  block = olmoe.SparseMoeBlock(cfg)
  block.gate = randn(E, D)                                    # (E, D): W_r
  block.experts.gate_up_proj = W_gate.cat(W_up).unsqueeze(0).repeat(E, 1, 1)
  block.experts.down_proj = W_down.unsqueeze(0).repeat(E, 1, 1)
  return block                           # (E, 2I, D) fused [gate; up], (E, D, I)

dense = swiglu(x).numpy()
one, (z, g, i) = moe_of_copies(E=1, k=1)(x)
four, (z4, g4, i4) = moe_of_copies(E=4, k=2)(x)
print("E=1, k=1:  max |MoE - dense| =", f"{np.abs(one.numpy() - dense).max():.1e}",
      "  g =", g.numpy().ravel())
print("E=4, k=2:  MoE / dense       =", (four.numpy() / dense).mean(-1).ravel().round(4))
print("           g_1 + g_2         =", g4.numpy().sum(-1).round(4))
