# Exercise 2, solution: switch on norm_topk_prob in the bundled OLMoE demo, which
# was trained without it, and measure the drift of its predictions on held-out text.
# requires: models/olmoe-demo/config.json
from dataclasses import replace
from pathlib import Path
import numpy as np
from tinygrad import Tensor
import olmoe

model, tok = olmoe.load("models/olmoe-demo", dtype="float32", progress=False)
text = " ".join(Path(f"demo/samples/{d}.txt").read_text()[:2000] for d in ("prose", "code", "math"))
ids = Tensor(np.array(tok.encode(text)[:512]).reshape(4, 128))

logits, routing = model(ids, return_routing=True)
before = logits.numpy()
mass = np.stack([g.numpy().sum(-1) for g in routing.weights])   # (L, N) sum of the k weights
for layer in model.layers: layer.mlp.cfg = replace(model.cfg, norm_topk_prob=True)
after = model(ids).numpy()
for layer in model.layers: layer.mlp.cfg = model.cfg               # back as trained

def log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))

kl = (np.exp(log_softmax(before)) * (log_softmax(before) - log_softmax(after))).sum(-1)
print(f"sum of the top-k weights in layer 0: median {np.median(mass[0]):.3f},",
      f"range {mass[0].min():.3f} .. {mass[0].max():.3f}")
print(f"max |logit change| {np.abs(after - before).max():.3f},",
      f"mean KL(before || after) {kl.mean():.4f} nats")
same = (before.argmax(-1) == after.argmax(-1)).mean()
print(f"most likely next token unchanged at {same:.0%} of positions")
