# DeepSeek-V3's gate on the same logits: sigmoid scores, and a bias that
# changes which experts are selected but not their weights.
import numpy as np

z = np.array([1.5, 0.5, 1.0, -0.5])   # the logits W_r h of the example above
b = np.array([0.0, 0.2, -0.1, 0.0])   # per-expert bias, adjusted to balance load
s = 1 / (1 + np.exp(-z))              # s_i = sigmoid(z_i): each expert on its own

chosen = np.argsort(-(s + b), kind="stable")[:2]   # select by s_i + b_i ...
g = s[chosen] / s[chosen].sum()                    # ... weigh by s_i alone

np.set_printoptions(precision=4, suppress=True)
print("s = sigmoid(z)     ", s)
print("s + b              ", s + b)
print("top-2 experts i    ", chosen)
print("g = s_i / sum s_j  ", g)
