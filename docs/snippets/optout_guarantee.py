# What opting out guarantees, on the bundled FlexOlmo (experts public, code, math):
# the opted-out model is the model built without the expert, and nothing it
# computes uses that expert's weights.
# requires: models/flexolmo-demo/config.json
import numpy as np
from tinygrad import Tensor
import flexolmo

full, tok = flexolmo.load("models/flexolmo-demo", progress=False)
names, out = full.cfg.names(), "code"
j = names.index(out)
# built without it: only the kept experts' FFNs and router rows are read from disk
without, _ = flexolmo.load("models/flexolmo-demo", opt_out=[out], progress=False)
print("full:", names, " built without:", without.cfg.names())

ids = Tensor([tok.encode("def add(a, b):\n    return a + b  # 12 + 30 = 42")])
full.select_experts(opt_out=[out])                 # masked: z_j = -inf
masked, routing = full(ids, return_routing=True)
masked, reference = masked.numpy(), without(ids).numpy()
print("max |logits opted out - logits built without| =",
      np.abs(masked - reference).max())
chosen = np.stack([i.numpy() for i in routing.experts])   # (L, N, k) expert ids
print(f"k = {full.top_k}; expert {j} ({out}) chosen in {(chosen == j).sum()}",
      f"of {chosen.size} slots")

# poison the opted-out expert: NaN in its FFN weights and in its router row.
# Any arithmetic that touched them would give NaN (NaN * 0 is NaN).
def poison(t: Tensor, row: int) -> Tensor:
  w = t.float().numpy()
  w[row] = np.nan
  return Tensor(w).cast(t.dtype).contiguous().realize()
for layer in full.layers:
  layer.mlp.experts.gate_up_proj = poison(layer.mlp.experts.gate_up_proj, j)
  layer.mlp.experts.down_proj = poison(layer.mlp.experts.down_proj, j)
  layer.mlp.gate = poison(layer.mlp.gate, j)
poisoned = full(ids).numpy()
print("with NaN weights, opted out: finite:", np.isfinite(poisoned).all(),
      " max |change| =", np.abs(poisoned - masked).max())
full.select_experts()                              # opted back in
back_in = full(ids).numpy()
print("with NaN weights, opted in:  finite:", np.isfinite(back_in).all())
