# Exercise 2, solution: switch on norm_topk_prob in a model that was trained
# without it, and measure the drift of its predictions.
from dataclasses import replace
import numpy as np
from tinygrad import Tensor
import olmoe, olmoe_checkpoint

rng = np.random.default_rng(0)
cfg = olmoe.OlmoeConfig(vocab_size=128, hidden_size=32, intermediate_size=32,
                        num_hidden_layers=2, num_attention_heads=4,
                        num_experts=8, num_experts_per_tok=2)
model = olmoe.Olmoe(cfg)                 # random weights (or the bundled model)
weights = {name: rng.normal(1.0 if "norm" in name else 0.0,
                            0.1 if "norm" in name else 0.2, w.shape).astype(np.float32)
           for name, w in model.parameters().items()}
olmoe_checkpoint.load_weights(model, {n: Tensor(w) for n, w in weights.items()},
                              progress=False)
ids = Tensor(rng.integers(0, cfg.vocab_size, (4, 16)))

logits, routing = model(ids, return_routing=True)
before = logits.numpy()
mass = np.concatenate([g.numpy().sum(-1) for g in routing.weights])  # sum of k weights
for layer in model.layers: layer.mlp.cfg = replace(cfg, norm_topk_prob=True)
after = model(ids).numpy()

def log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))

kl = (np.exp(log_softmax(before)) * (log_softmax(before) - log_softmax(after))).sum(-1)
print(f"sum of the top-k weights before: median {np.median(mass):.3f},",
      f"range {mass.min():.3f} .. {mass.max():.3f}")
print(f"max |logit change| {np.abs(after - before).max():.3f},",
      f"mean KL(before || after) {kl.mean():.4f} nats")
same = (before.argmax(-1) == after.argmax(-1)).mean()
print(f"most likely next token unchanged at {same:.0%} of positions")
