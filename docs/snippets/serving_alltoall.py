# Expert parallelism for OLMoE-1B-7B: the bytes one token moves per layer in
# the dispatch and combine all-to-alls, when the 64 experts of every layer are
# spread over G devices (E/G each) and the token's 8 experts are uniform.
from math import comb

E, k, L, D, B16 = 64, 8, 16, 2048, 2   # B16: bytes of a bf16 number
vec = D * B16                          # one hidden state: 4 kB
print(f"One hidden state is {vec / 1e3:.1f} kB.",
      "Per token and layer, dispatch and combine move:")
print()
print("| devices G | experts per device | devices a token reaches | of them remote "
      "| kB per token per layer | MB per token, all layers |")
print("|---|---|---|---|---|---|")
moved = {}
for G in (1, 2, 8, 16, 64):
  miss = comb(E - E // G, k) / comb(E, k)   # P(a device holds none of the k)
  reached = G * (1 - miss)                  # expected distinct devices
  remote = (G - 1) * (1 - miss)             # the token's own sends nothing
  # one copy of h to each remote device, one partial sum back from each
  moved[G] = 2 * remote * vec
  print(f"| {G} | {E // G} | {reached:.2f} | {remote:.2f} | {moved[G] / 1e3:.1f} "
        f"| {L * moved[G] / 1e6:.2f} |")
print()
naive = 2 * k * vec                     # a copy per expert, none local
print(f"Without de-duplication or local experts: {naive / 1e3:.1f} kB per token",
      f"per layer, {L * naive / 1e6:.2f} MB over {L} layers.")
