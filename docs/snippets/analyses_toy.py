# The routing statistics of the OLMoE paper on a routing small enough to check
# by hand: 6 tokens, E = 4, k = 2.
import numpy as np

E, k = 4, 2
experts = np.array([[0, 1], [0, 2], [1, 0], [3, 2], [0, 1], [2, 3]])   # (N, k)
domain = np.array(["code"] * 3 + ["prose"] * 3)        # where each token came from
final = np.array([[0, 1], [0, 3], [1, 2], [3, 2], [1, 0], [2, 3]])     # last checkpoint
N = len(experts)
hit = np.zeros((N, E), bool)                            # hit[n, i]: i in T_n
hit[np.arange(N)[:, None], experts] = True

load = hit.mean(0)                                      # share of tokens per expert
both = hit.T.astype(int) @ hit                          # N(i, j), N(i) on the diagonal
coact = both / np.diag(both)[:, None]                   # CoAct(i, j) = N(i, j) / N(i)
np.fill_diagonal(coact, 0)
spec = {d: hit[domain == d].mean(0) for d in ("code", "prose")}   # N_k(i, D) / N_D
saturation = np.mean([len(set(a) & set(b)) / k for a, b in zip(experts, final)])

np.set_printoptions(precision=3, suppress=True)
print("load per expert        ", load, f"  (uniform: k/E = {k / E})")
print("co-activation, row i = N(i, j) / N(i):")
print(coact)
print("domain spec., code     ", spec["code"])
print("domain spec., prose    ", spec["prose"])
print("saturation vs final    ", round(saturation, 4))
