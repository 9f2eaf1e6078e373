# Loading only the kept experts of the bundled FlexOlmo, and which experts wrote
# a generated text.
# requires: models/flexolmo-demo/config.json
import numpy as np
from tinygrad import Tensor
import flexolmo, olmoe

full, tok = flexolmo.load("models/flexolmo-demo", progress=False)          # every expert
kept, _ = flexolmo.load("models/flexolmo-demo", experts=["public", 2], progress=False)   # names or indices
size = lambda m: sum(t.numel() for t in m.parameters().values())
print("kept:", kept.cfg.names(), f"{size(kept):,} of {size(full):,} parameters")
full.select_experts(["public", "math"])                    # the same choice, masked
ids = Tensor([tok.encode("12 + 30 = 42")])
print("max |logits kept - logits masked| =", np.abs(kept(ids).numpy() - full(ids).numpy()).max())

prompt = "def add(a, b):"
steps = list(olmoe.generate(kept, [tok.encode(prompt)], 16, with_routing=True))
text = tok.decode([s.tokens[0] for s in steps if s.tokens[0] not in kept.cfg.eos_ids])
shares = flexolmo.attribution(steps, kept.cfg.names(), kept.cfg.eos_ids)[0]   # prompt 0
print(repr(prompt + text))
print("attribution:", flexolmo.format_shares(shares))
