# Why decoding an MoE is memory-bound, and what batching buys: bytes moved per token against bandwidth.
E, k, L, D = 64, 8, 16, 2048                      # OLMoE-1B-7B
expert = 3 * D * 1024                              # parameters of one SwiGLU expert
total, active = 6_919_161_856, 1_281_884_160       # from the parameter-count table (param_counts.py)
shared = active - L * k * expert                   # attention, norms, routers, embedding and LM head
bytes_per_param = 2                                # bf16
bandwidth, flops = 3.35e12, 989e12                 # an H100 SXM: HBM bytes/s and dense bf16 FLOP/s

print(f"batch 1: {active * bytes_per_param / 1e9:.2f} GB of weights read per token, "
      f"{2 * active / 1e9:.2f} GFLOP computed (2 per weight)")
print(f"  time to read them {active * bytes_per_param / bandwidth * 1e3:.2f} ms, to compute {2 * active / flops * 1e6:.1f} us"
      f"  -> at most {bandwidth / (active * bytes_per_param):.0f} tokens/s, memory-bound by "
      f"{(active * bytes_per_param / bandwidth) / (2 * active / flops):.0f}x")
print(f"all {total / 1e9:.2f}B parameters stay in memory: {total * bytes_per_param / 1e9:.1f} GB in bf16")
print()
print("batch B | experts touched per layer | GB read per step | GB per token | same for a dense 1.3B model")
for B in (1, 4, 16, 64, 256):
  touched = E * (1 - (1 - k / E) ** B)           # expected distinct experts if the B tokens route independently
  step = (shared + L * touched * expert) * bytes_per_param
  print(f"{B:7d} | {touched:25.1f} | {step / 1e9:16.2f} | {step / B / 1e9:12.3f} | {active * bytes_per_param / B / 1e9:.3f}")
print()
kv = 2 * L * D * bytes_per_param                   # keys and values of every layer, nkv*hd = D
print(f"KV cache: {kv / 1e3:.0f} kB per token, {kv * 4096 / 1e9:.2f} GB for one 4096-token sequence")
a2a = 2 * k * D * bytes_per_param * L              # send the hidden state to k experts and back, every layer
print(f"expert parallelism: {a2a / 1e6:.2f} MB of all-to-all traffic per token (2 x k x D x 2 bytes x {L} layers)")
