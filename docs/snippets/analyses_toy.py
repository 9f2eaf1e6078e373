# The routing statistics of the OLMoE paper on a routing small enough to check by hand: 6 tokens, E = 4, k = 2.
import numpy as np

E, k = 4, 2
experts = np.array([[0, 1], [0, 2], [1, 0], [3, 2], [0, 1], [2, 3]])      # (N, k) each token's chosen experts
domain = np.array(["code", "code", "code", "prose", "prose", "prose"])    # where each token came from
final = np.array([[0, 1], [0, 3], [1, 2], [3, 2], [1, 0], [2, 3]])        # the same tokens at the final checkpoint
hit = np.zeros((len(experts), E), bool)
hit[np.arange(len(experts))[:, None], experts] = True                     # (N, E) token n uses expert e

load = hit.sum(0) / len(experts)                                          # share of tokens using each expert
coact = (hit.T.astype(int) @ hit) / hit.sum(0)[:, None]                   # CoAct[i, j] = N(i, j) / N(i)
np.fill_diagonal(coact, 0)
spec = {d: hit[domain == d].mean(0) for d in ("code", "prose")}           # DomainSpec(e, D) = N_k(e, D) / N_D
saturation = np.mean([len(set(a) & set(b)) / k for a, b in zip(experts, final)])

np.set_printoptions(precision=3, suppress=True)
print("load (share of tokens per expert)  ", load, f"  uniform: k/E = {k / E}")
print("co-activation N(i,j)/N(i), row i:\n", coact)
print("domain specialisation, code        ", spec["code"])
print("domain specialisation, prose       ", spec["prose"])
print("router saturation vs final (top-2) ", round(saturation, 4))
