# Why decoding an MoE is memory-bound, and what batching buys:
# bytes moved per token against memory bandwidth (OLMoE-1B-7B, bf16).
E, k, L, D, I, V = 64, 8, 16, 2048, 1024, 50304
expert = 3 * D * I                     # parameters of one SwiGLU expert
total, active = 6_919_161_856, 1_282_017_280   # from the table of page 2
shared = active - L * k * expert       # attention, norms, routers, embeddings
B16 = 2                                # bytes per bf16 parameter
bandwidth, flops = 3.35e12, 989e12     # an H100 SXM: HBM bytes/s, dense bf16 FLOP/s

# per token at batch 1: every active weight once (2 FLOPs each), but of the
# V x D embedding matrix only the token's own row
read, work = (active - V * D + D) * B16, 2 * (active - V * D)
print(f"batch 1: {read / 1e9:.2f} GB read and {work / 1e9:.2f} GFLOP per token")
t_read, t_work = read / bandwidth, work / flops
print(f"  reading takes {t_read * 1e3:.2f} ms, computing {t_work * 1e6:.1f} us:",
      f"memory-bound by {t_read / t_work:.0f}x")
print(f"  at most {bandwidth / read:.0f} tokens/s for one sequence")
print(f"resident: all {total / 1e9:.2f}B parameters, {total * B16 / 1e9:.1f} GB")
print()
print("batch B  experts touched  GB read per step  GB per token  (dense 1.3B model)")
def step_bytes(B):                     # a decode step of B tokens: B embedding rows,
  touched = E * (1 - (1 - k / E) ** B)   # the expected distinct experts per layer,
  return touched, (shared - V * D + B * D + L * touched * expert) * B16   # the rest once

for B in (1, 4, 16, 64, 256):
  touched, step = step_bytes(B)
  print(f"{B:7d}  {touched:15.1f}  {step / 1e9:16.2f}  {step / B / 1e9:12.3f}"
        f"  ({read / B / 1e9:.3f})")
print()
kv = 2 * L * D * B16                   # keys and values, every layer
print(f"KV cache: {kv / 1e3:.0f} kB per token, {kv * 4096 / 1e9:.2f} GB per 4096 tokens,",
      f"all read again at every decode step ({kv * 4096 / read:.0%} of the weight bytes at 4096)")
a2a = 2 * k * D * B16 * L              # to the k experts and back, every layer
print(f"expert parallelism: {a2a / 1e6:.2f} MB of all-to-all traffic per token")
