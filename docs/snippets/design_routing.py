# Token choice (what OLMoE does) against expert choice, on the router
# probabilities of the bundled demo model (E = 16 experts, k = 2) for one text.
# requires: models/olmoe-demo/config.json
import numpy as np
from tinygrad import Tensor
import olmoe

model, tok = olmoe.load("models/olmoe-demo", progress=False)
E, k = model.cfg.num_experts, model.cfg.num_experts_per_tok
ids = tok.encode("The router sends each token to a few experts, and 12 + 30 = 42.")
_, routing = model(Tensor([ids]), return_routing=True)
layer = 1
z = routing.logits[layer].float().numpy()          # (N, E) router logits
p = np.exp(z - z.max(-1, keepdims=True))
p /= p.sum(-1, keepdims=True)                      # (N, E) probabilities
tc = routing.experts[layer].numpy()                # (N, k) token choice
N, C = len(ids), len(ids) * k // E                 # 24 * 2 / 16: the same
assert N * k == C * E                              # N*k pairs in all

def expert_choice(p, C):
  """(N, E) bool: each expert takes its C most probable tokens."""
  top = np.argsort(-p, axis=0, kind="stable")[:C]
  out = np.zeros(p.shape, bool)
  out[top, np.arange(p.shape[1])] = True
  return out

ec = expert_choice(p, C)
print(f"N = {N} tokens, layer {layer}; expert choice takes C = N k / E = {C}",
      "per expert")
print("token         token choice (k = 2)   expert choice")
for n in range(N):
  token, ec_n = tok.decode([ids[n]]), np.flatnonzero(ec[n]).tolist()
  print(f"{token!r:13} {str(tc[n].tolist()):22} {ec_n}")
load = np.bincount(tc.ravel(), minlength=E)
per_token = ec.sum(1)
print(f"token choice: every token gets {k} experts;",
      f"expert loads {load.min()} to {load.max()}")
print(f"expert choice: every expert gets {C} tokens;",
      f"experts per token {per_token.min()} to {per_token.max()}")
print(f"  tokens with none: {(per_token == 0).sum()}")
half = N // 2                                      # the first half alone:
_, r_half = model(Tensor([ids[:half]]), return_routing=True)
tc_changed = (r_half.experts[layer].numpy() != tc[:half]).any(1).sum()
ec_changed = (expert_choice(p[:half], half * k // E) != ec[:half]).any(1).sum()
print(f"routing only the first {half} tokens changes the experts")
print(f"  of {ec_changed} under expert choice, of {tc_changed} under token choice")
