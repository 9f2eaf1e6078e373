# Granularity: the same expert parameters cut into more, smaller experts, with
# k raised so that each token still uses the same number of them (OLMoE's
# width D = 2048 and its 64 x 1024 = 65536 expert hidden units per layer).
from math import comb

D, units, active_units = 2048, 64 * 1024, 8 * 1024   # all experts / chosen experts
print("| experts E | chosen k | expert width I | active expert params per layer "
      "| expert sets C(E, k) |")
print("|---|---|---|---|---|")
rows = {}
for E in (8, 16, 32, 64, 128):
  I = units // E
  k = active_units // I                              # k * I: the same in every row
  rows[E] = comb(E, k)
  print(f"| {E} | {k} | {I} | {3 * D * k * I / 1e6:.1f}M | {rows[E]:.3g} |")
# a shared expert: one of the 64 always on, 7 chosen among the other 63
shared = comb(63, 7)
print(f"| 1 shared + 63 | 1 + 7 | 1024 | {3 * D * 8 * 1024 / 1e6:.1f}M "
      f"| {shared:.3g} |")
print()
print(f"64 experts give {rows[64] / shared:.1f}x the expert sets of a shared expert",
      f"plus 7 of 63, and {rows[64] / rows[8]:.2g}x those of 1 of 8")
