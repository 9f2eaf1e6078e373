# What moving OLMoE-1B-7B's experts costs: the bytes of one expert and of all of
# them, in bf16 and as olmoe_int8.py holds them (int8, one fp32 scale per output
# row), and the time to fetch one over a host link.
E, k, L, D, I = 64, 8, 16, 2048, 1024
params = 3 * D * I              # gate and up (I x D each), down (D x I)
rows = 2 * I + D                # output rows of the three matrices
bf16 = 2 * params
int8 = params + 4 * rows
link = 25e9                     # an assumed 25 GB/s host-to-accelerator link
print(f"one expert: {params / 1e6:.2f}M parameters, {bf16 / 1e6:.1f} MB in bf16,",
      f"{int8 / 1e6:.1f} MB in int8")
print(f"all {L * E} experts: {L * E * bf16 / 1e9:.1f} GB in bf16,",
      f"{L * E * int8 / 1e9:.1f} GB in int8")
print(f"a cache miss at {link / 1e9:.0f} GB/s: {bf16 / link * 1e3:.2f} ms per expert",
      "in bf16;")
print(f"a token that misses all its {L * k} experts waits",
      f"{L * k * bf16 / link * 1e3:.0f} ms")
