# RoPE as olmoe.py applies it (rotate-half), and QK-norm over the full width
# versus per head.
import numpy as np
from tinygrad import Tensor
import olmoe

cfg = olmoe.OlmoeConfig(hidden_size=16, num_attention_heads=2)  # hd = 8
hd = cfg.head_dim
inv_freq = olmoe.rope_inv_freq(cfg)          # (hd/2,): theta_j = 10000^(-2j/hd)
rng = np.random.default_rng(0)
q, k = rng.normal(size=(2, hd)).astype(np.float32)

def rotate(x, pos):                          # one head's vector at one position
  cos, sin = olmoe.rope_tables(Tensor([[pos]]), inv_freq)          # (1, 1, 1, hd)
  return olmoe.apply_rope(Tensor(x).reshape(1, 1, 1, hd), cos, sin).numpy().ravel()

# rotate-half = multiplying c_j = x_j + i x_{j+hd/2} by exp(i pos theta_j)
c = (q[:hd // 2] + 1j * q[hd // 2:]) * np.exp(1j * 7 * inv_freq.numpy())
diff = np.abs(rotate(q, 7) - np.concatenate([c.real, c.imag])).max()
print(f"rotate-half vs complex rotation, max difference {diff:.1e}")

# the score depends on the two positions only through their difference
for m, n in [(5, 2), (13, 10), (1000, 997), (3, 0)]:
  print(f"q at {m:4d} . k at {n:4d} = {rotate(q, m) @ rotate(k, n):+.5f}")

# QK-norm: one RMSNorm over all nh*hd features, not one per head
x = np.concatenate([rng.normal(size=hd), 10 * rng.normal(size=hd)])  # head 1 is 10x
x = Tensor(x.astype(np.float32))
eps = cfg.rms_norm_eps
full = olmoe.rms_norm(x, Tensor.ones(2 * hd), eps).numpy().reshape(2, hd)
per_head = olmoe.rms_norm(x.reshape(2, hd), Tensor.ones(hd), eps).numpy()
rms = lambda a: np.sqrt((a ** 2).mean(-1)).round(3)
print("RMS of each head after the full-width norm:", rms(full))
print("RMS of each head after a per-head norm:    ", rms(per_head))
