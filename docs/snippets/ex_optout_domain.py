# Exercise 5, solution: the bundled FlexOlmo's loss per domain, with all experts
# and with each expert opted out.
# requires: models/flexolmo-demo/config.json
import numpy as np
from tinygrad import Tensor
import flexolmo

model, tok = flexolmo.load("models/flexolmo-demo", progress=False)
names = model.cfg.names()
texts = {}   # filled in from the demo's held-out texts

def loss(text: str) -> float:
  ids = Tensor([tok.encode(text)])
  logits = model(ids)
  return logits[:, :-1].float().sparse_categorical_crossentropy(ids[:, 1:]).item()

print("experts:", names)
