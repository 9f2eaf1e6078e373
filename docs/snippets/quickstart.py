# The Python API on the bundled demo model: logits, routing, and generation.
# requires: models/olmoe-demo/config.json
from tinygrad import Tensor
import olmoe

model, tok = olmoe.load("models/olmoe-demo", progress=False)
c = model.cfg
print(f"L = {c.num_hidden_layers} layers, E = {c.num_experts}, k = {c.num_experts_per_tok}")

ids = tok.encode("The mixture of experts")
logits, routing = model(Tensor([ids]), return_routing=True)   # (1, T, V), routing
experts, weights = routing.experts[0][-1], routing.weights[0][-1]   # layer 0, last token
print("logits", logits.shape)
print("layer 0, last token: experts", experts.tolist(),
      "weights", [round(w, 3) for w in weights.tolist()])

steps = olmoe.generate(model, [ids], max_new_tokens=16)      # greedy by default
new = [step.tokens[0] for step in steps]
print(repr(tok.decode(ids + new)))
