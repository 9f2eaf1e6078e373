# RoPE as olmoe.py applies it (rotate-half), and QK-norm over the full width versus per head.
import numpy as np
from tinygrad import Tensor
import olmoe

cfg = olmoe.OlmoeConfig(hidden_size=16, num_attention_heads=2)      # hd = 8: pairs (x_j, x_{j+4}), j < 4
hd = cfg.head_dim
inv_freq = olmoe.rope_inv_freq(cfg)                                 # (hd/2,) theta_j = 10000^(-2j/hd)
rng = np.random.default_rng(0)
q, k = rng.normal(size=hd).astype(np.float32), rng.normal(size=hd).astype(np.float32)

def rotate(x, pos):                                                 # one head vector at one position
  cos, sin = olmoe.rope_tables(Tensor([[pos]]), inv_freq)           # (1, 1, 1, hd)
  return olmoe.apply_rope(Tensor(x).reshape(1, 1, 1, hd), cos, sin).numpy().ravel()

# rotate-half = multiplying the complex numbers c_j = x_j + i x_{j+hd/2} by e^{i pos theta_j}
c = (q[:hd // 2] + 1j * q[hd // 2:]) * np.exp(1j * 7 * inv_freq.numpy())
print("rotate-half vs complex rotation, max diff:", f"{np.abs(rotate(q, 7) - np.concatenate([c.real, c.imag])).max():.1e}")

# the score depends on positions only through their difference
for m, n in [(5, 2), (13, 10), (1000, 997)]:
  print(f"q at {m:4d} . k at {n:4d} = {rotate(q, m) @ rotate(k, n):+.5f}")
print(f"q at    3 . k at    0 = {rotate(q, 3) @ rotate(k, 0):+.5f}   (no rotation of k at position 0)")

# QK-norm: OLMoE's q_norm is one RMSNorm over all nh*hd features (weight of nh*hd), not one per head
x = Tensor(np.concatenate([rng.normal(size=hd), 10 * rng.normal(size=hd)]).astype(np.float32))   # head 1 is 10x larger
full = olmoe.rms_norm(x, Tensor.ones(2 * hd), cfg.rms_norm_eps).numpy()
per_head = np.concatenate([olmoe.rms_norm(x[:hd], Tensor.ones(hd), cfg.rms_norm_eps).numpy(),
                           olmoe.rms_norm(x[hd:], Tensor.ones(hd), cfg.rms_norm_eps).numpy()])
print("RMS of each head after the full-width norm:", np.sqrt((full.reshape(2, hd) ** 2).mean(1)).round(3))
print("RMS of each head after a per-head norm:    ", np.sqrt((per_head.reshape(2, hd) ** 2).mean(1)).round(3))
