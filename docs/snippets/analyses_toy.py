# The routing statistics of demo/analysis.py on a routing small enough to check
# by hand: 6 tokens, E = 4 experts, k = 2.
import numpy as np
from demo import analysis

E, k = 4, 2
experts = np.array([[0, 1], [0, 2], [1, 0], [3, 2], [0, 1], [2, 3]])   # (N, k)
final = np.array([[0, 1], [0, 3], [1, 2], [3, 2], [1, 0], [2, 3]])     # last checkpoint
domain = np.array(["code"] * 3 + ["prose"] * 3)       # where each token came from
token = np.array([7, 7, 9, 5, 7, 5])                  # each position's token id

load = analysis.expert_load(experts, E)               # share of tokens per expert
coact = analysis.coactivation(experts, E)             # CoAct(i, j) = N(i, j) / N(i)
spec = {d: analysis.domain_specialisation(experts[domain == d], E) for d in ("code", "prose")}
ids, counts, vocab = analysis.vocabulary_specialisation(experts, token, E)
saturation = analysis.router_saturation(experts, final)

np.set_printoptions(precision=3, suppress=True)
print("load per expert        ", load, f"  (uniform: k/E = {k / E})")
print("co-activation, row i = N(i, j) / N(i):")
print(coact)
print("domain spec., code     ", spec["code"])
print("domain spec., prose    ", spec["prose"])
for x, n, row in zip(ids, counts, vocab):
  print(f"vocab spec., token {x} ({n}x)", row)
print("saturation vs final    ", round(saturation, 4))
