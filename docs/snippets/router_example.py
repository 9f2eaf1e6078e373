# The worked example of "The router": one token, E = 4 experts, k = 2.
import numpy as np
from tinygrad import Tensor
import olmoe

h = Tensor([[1.0, -1.0, 0.5, 2.0]])      # (N=1, D=4): one token's hidden state
W_r = Tensor([[1.0, 0.0, 1.0, 0.0],      # (E=4, D=4): one router row per expert
              [0.5, 0.0, 0.0, 0.0],
              [0.0, 0.0, 0.0, 0.5],
              [0.0, 0.5, 0.0, 0.0]])

# OLMoE: g_i = p_i, no renormalisation
z, g, i = olmoe.route(h, W_r, k=2)
# Mixtral / Qwen-MoE style: the k weights renormalised to sum to 1
_, g_renorm, _ = olmoe.route(h, W_r, k=2, renormalise=True)
p = z.softmax(-1)                        # all four probabilities, to show them

np.set_printoptions(precision=4, suppress=True)
print("z = W_r h          ", z.numpy()[0])
print("p = softmax(z)     ", p.numpy()[0])
print("top-2 experts i    ", i.numpy()[0])
print("OLMoE g = p_i      ", g.numpy()[0], " sum", g.numpy().sum().round(4))
print("renormalised g     ", g_renorm.numpy()[0], " sum", g_renorm.numpy().sum().round(4))
