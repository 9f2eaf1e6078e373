# Total and active parameters of OLMoE-1B-7B, read off the model olmoe.py builds
# from its default config (which is OLMoE-1B-7B's), and the work per token of
# the MoE against a dense model of the same active size.
import math
import olmoe

cfg = olmoe.OlmoeConfig()       # E = 64, k = 8, D = 2048, I = 1024, L = 16
model = olmoe.Olmoe(cfg)        # lazy: no weight is allocated here
sizes = {name: math.prod(t.shape) for name, t in model.parameters().items()}
total = sum(sizes.values())
experts = sum(n for name, n in sizes.items() if ".experts." in name)
active = total - experts + experts * cfg.num_experts_per_tok // cfg.num_experts
embed = sizes["embed_tokens"]   # a token reads one row of it, not all
print(f"total  {total:,} parameters ({experts / total:.0%} in the experts)")
print(f"active {active:,} per token ({active / total:.1%} of the total)")

# forward FLOPs per token: 2 per weight used (the embedding is a lookup);
# training (forward + backward) is about 3 times that
flops = 2 * (active - embed)
print(f"forward {flops / 1e9:.2f} GFLOP per token,",
      f"training about {3 * flops / 1e9:.1f} GFLOP")
print("a dense model with the same active parameters does the same work,")
print(f"but holds {active * 2 / 1e9:.1f} GB of bf16 weights",
      f"where OLMoE holds {total * 2 / 1e9:.1f} GB")
