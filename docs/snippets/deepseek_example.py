# DeepSeek-V3's gate on the same logits: sigmoid scores, a bias that only changes which experts are selected.
import numpy as np

z = np.array([1.5, 0.5, 1.0, -0.5])                 # the logits W_r h of the example above
b = np.array([0.0, 0.2, -0.1, 0.0])                 # per-expert bias, adjusted during training to balance load
s = 1 / (1 + np.exp(-z))                            # s_i = sigmoid(z_i): each expert scored on its own
chosen = np.argsort(-(s + b), kind="stable")[:2]    # top-2 of s_i + b_i: the bias moves the selection...
g = s[chosen] / s[chosen].sum()                     # ...but the weights use s_i alone, normalised over the chosen

np.set_printoptions(precision=4, suppress=True)
print("s = sigmoid(z)      ", s)
print("s + b               ", s + b)
print("top-2 experts i     ", chosen)
print("g = s_i / sum s_j   ", g)
