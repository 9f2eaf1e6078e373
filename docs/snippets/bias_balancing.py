# Auxiliary-loss-free balancing as olmoe.py runs it, on a one-layer model whose router
# favours experts 0 and 1 for every token: route a fixed batch, move the bias with
# olmoe.update_router_bias, repeat. No gradient step: only the bias moves.
import numpy as np
from tinygrad import Tensor
import olmoe

E, k, gamma = 8, 2, 0.01
cfg = olmoe.OlmoeConfig(vocab_size=64, hidden_size=16, intermediate_size=16,
                        num_hidden_layers=1, num_attention_heads=2, num_experts=E,
                        num_experts_per_tok=k, router_bias_rate=gamma)
Tensor.manual_seed(0)
model = olmoe.Olmoe(cfg)
rng = np.random.default_rng(0)
mean = rng.normal(size=16).astype(np.float32)          # a direction every token shares
embed = rng.normal(size=(64, 16)).astype(np.float32) + mean
model.embed_tokens.assign(Tensor(embed)).realize()
gate = rng.normal(size=(E, 16)).astype(np.float32) * 0.3
gate[:2] += mean / np.linalg.norm(mean)                # experts 0, 1: higher logits for all
model.layers[0].mlp.gate.assign(Tensor(gate)).realize()
ids = Tensor(rng.integers(0, 64, size=(4, 16)).astype(np.int32))   # 64 tokens

mlp = model.layers[0].mlp
print("step  load / uniform per expert                  bias of experts 0, 1, 7")
for step in range(30):
  _, routing = model(ids, return_routing=True)
  i = routing.experts[0].numpy()                       # (64, k) chosen with p + bias
  load = np.bincount(i.ravel(), minlength=E) / i.size  # numpy: shares of the pairs
  b_before = mlp.expert_bias.numpy()
  olmoe.update_router_bias(model, routing)
  b = mlp.expert_bias.numpy()
  # the rule, by hand (no expert has exactly the mean load here)
  assert np.allclose(b, b_before + gamma * np.sign(load.mean() - load), atol=1e-6)
  if step % 5 == 0 or step == 29:
    print(f"{step:4d}  {' '.join(f'{x:4.2f}' for x in load * E)}"
          f"   {b[0]:+.2f} {b[1]:+.2f} {b[7]:+.2f}")

# the weights are the unbiased probabilities of the chosen experts: the bias steers the
# choice only
p = routing.logits[0].float().softmax(-1).numpy()
g = routing.weights[0].float().numpy()
own_top = np.sort(np.argsort(-p, 1)[:, :k], 1)
print("weights = unbiased p of the chosen experts:",
      np.allclose(g, np.take_along_axis(p, i, 1), atol=1e-6))
print("tokens whose top-2 of p differs from the chosen:",
      int((own_top != np.sort(i, 1)).any(1).sum()), "of", len(p))
