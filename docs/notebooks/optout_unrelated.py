# %% [markdown]
# # Build it 6: what opting out does to text the expert was not trained for
#
# Opt the code expert out of the bundled FlexOlmo and measure how the next-token distribution changes on prose and
# math, text the code expert never saw: the KL divergence, how often the most likely token changes, and how the
# change follows the code expert's router probability. The question and the written answers are on the course page
# "Build it" (docs/build.md).

# %%
# The models and samples are found from the repository root, wherever the notebook runs inside the checkout.
import os, sys
from pathlib import Path
ROOT = next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "models" / "flexolmo-demo").is_dir())
os.chdir(ROOT); sys.path.insert(0, str(ROOT))
import olmoe_compiler; olmoe_compiler.use_cpu_target()   # a CPU compile target clang can finish (bf16)

# %%
import numpy as np
from tinygrad import Tensor
import flexolmo

model, tok = flexolmo.load("models/flexolmo-demo", dtype="float32", progress=False)
names = model.cfg.names()                           # ['public', 'code', 'math']
DOMAINS, T = ("prose", "math", "code"), 256
ids = Tensor(np.array([tok.encode(Path(f"demo/samples/{d}.txt").read_text())[:T] for d in DOMAINS], dtype=np.int32))

def log_softmax(x: np.ndarray) -> np.ndarray:
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))

full_logits, routing = model(ids, return_routing=True)
full = log_softmax(full_logits.numpy())                                   # (3, T, V) next-token log-probabilities
p_code = np.stack([np.exp(log_softmax(z.numpy()))[:, names.index("code")] for z in routing.logits])   # (L, 3T)
model.select_experts(opt_out=["code"])
masked = log_softmax(model(ids).numpy())
model.select_experts()

# %%
kl = (np.exp(full) * (full - masked)).sum(-1)                             # (3, T) KL(full || code opted out), nats
flips = full.argmax(-1) != masked.argmax(-1)                              # (3, T) most likely token changed
print(f"{'text':6s} {'mean KL (nats)':>15s} {'largest KL':>11s} {'top-1 changed':>14s} {'mean p_code':>12s}")
for n, d in enumerate(DOMAINS):
  print(f"{d:6s} {kl[n].mean():15.4f} {kl[n].max():11.4f} {flips[n].mean():14.1%} {p_code[:, n * T:(n + 1) * T].mean():12.4f}")

# %% [markdown]
# With g_i = p_i, removing expert j divides every other expert's weight by 1 - p_j. In the first layer nothing
# before the MoE block depends on the experts, so that is exactly what happens there; later layers see changed inputs.
# How closely does a position's KL follow the code expert's first-layer probability?

# %%
first = p_code[0].reshape(len(DOMAINS), T)
for n, d in enumerate(DOMAINS[:2]):
  r = np.corrcoef(np.log(first[n]), np.log(kl[n] + 1e-12))[0, 1]
  assert r > 0                                      # the answer on the page: the change follows p_code
  print(f"{d}: correlation of log p_code (layer 0) with log KL over the positions: {r:.2f}")

# %%
# opting out is loading the model without the expert: same logits (the claim of exercise 4 on the Exercises page)
smaller, _ = flexolmo.load("models/flexolmo-demo", opt_out=["code"], dtype="float32", progress=False)
assert np.allclose(log_softmax(smaller(ids).numpy()), masked, atol=1e-4)
# what the answers on the page say: opting out changes every text a little and the code expert's own text most
assert (kl > 0).all()
assert kl[2].mean() > max(kl[0].mean(), kl[1].mean())
