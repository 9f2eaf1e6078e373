# Total and active parameters, counted from the real configs
# (the config.json fields that set the sizes).
OLMOE_1B_7B = dict(
  vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
  num_attention_heads=16, num_key_value_heads=16, num_experts=64,
  num_experts_per_tok=8, tie_word_embeddings=False)
FLEXOLMO_7X7B = dict(
  vocab_size=100352, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
  num_attention_heads=32, num_key_value_heads=32, num_experts=7,
  num_experts_per_tok=7, tie_word_embeddings=False)

def count(c: dict, k: int | None = None) -> dict:
  """Parameters of an OLMoE/FlexOlmo config: total, and active per token when
  each token uses k experts."""
  V, D, I = c["vocab_size"], c["hidden_size"], c["intermediate_size"]
  L, E, k = c["num_hidden_layers"], c["num_experts"], k or c["num_experts_per_tok"]
  hd = D // c["num_attention_heads"]
  nq, nkv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
  attention = 2 * D * nq + 2 * D * nkv    # q_proj, o_proj; k_proj, v_proj
  norms = 2 * D + nq + nkv                # the two block norms, q_norm, k_norm
  router = E * D                          # W_r
  expert = 3 * D * I                      # one SwiGLU expert: gate, up, down
  embed = V * D * (1 if c["tie_word_embeddings"] else 2)   # embedding, LM head
  # everything but the experts is used by every token (+ D: the final norm)
  shared = embed + D + L * (attention + norms + router)
  return {"total": shared + L * E * expert, "active": shared + L * k * expert,
          "experts": L * E * expert, "expert": expert, "shared": shared}

def b(n: int) -> str: return f"{n / 1e9:.2f}B"

if __name__ == "__main__":
  rows = [("OLMoE-1B-7B", OLMOE_1B_7B, None),
          ("FlexOlmo-7x7B-1T (as released, k = 7)", FLEXOLMO_7X7B, None),
          ("FlexOlmo-7x7B-1T with k = 4", FLEXOLMO_7X7B, 4)]
  print("| model | E | k | one expert | all experts | shared | total | active per token |")
  print("|---|---|---|---|---|---|---|---|")
  for name, c, k in rows:
    n = count(c, k)
    print(f"| {name} | {c['num_experts']} | {k or c['num_experts_per_tok']} "
          f"| {n['expert'] / 1e6:.1f}M | {b(n['experts'])} | {b(n['shared'])} "
          f"| **{b(n['total'])}** | **{b(n['active'])}** |")
