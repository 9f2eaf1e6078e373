# Memory for the weights, from the parameter counts of page 2 (param_counts.py).
from param_counts import FLEXOLMO_7X7B, OLMOE_1B_7B, count

print("| model | total | active per token | weights in bf16 | in fp32 |")
print("|---|---|---|---|---|")
for name, c in [("OLMoE-1B-7B", OLMOE_1B_7B), ("FlexOlmo-7x7B-1T", FLEXOLMO_7X7B)]:
  n = count(c)
  print(f"| {name} | {n['total'] / 1e9:.2f}B | {n['active'] / 1e9:.2f}B "
        f"| {2 * n['total'] / 1e9:.1f} GB | {4 * n['total'] / 1e9:.1f} GB |")
