"""The OLMoE paper's routing analyses (arXiv 2409.02060 §5), as pure functions on routing tables, and their figures.

A routing table is what the router chose: `experts`, an int array (N, k) of expert ids for N tokens at one layer
(slot 0 the most probable), and, where needed, `weights` (N, k) the router probabilities of those slots. Stack the
layers to get (L, N, k). Every function below takes plain numpy arrays, so the tests check them on tables small
enough to count by hand; `routing_tables()` at the end is the one place that runs a model.

  expert_load(experts, E)                 share of tokens whose top-k contains expert e      (uniform: k/E)
  coactivation(experts, E)                N(i, j) / N(i) over ALL pairs of the top-k slots   (asymmetric)
  domain_specialisation(experts, E)       expert_load of one domain's tokens                 (uniform: k/E)
  vocabulary_specialisation(experts, ids) per token id x: share of x's occurrences routed to e
  router_saturation(early, final)         mean |top-k early ∩ top-k final| / k per token     (1 = same sets)

Definitions are the paper's. Where its released scripts differ, this file follows the paper's text and says so:
co-activation counts every pair of the k chosen experts (the script counts only adjacent slots of the ranked list).
"""
from __future__ import annotations
from pathlib import Path
import numpy as np


# ============================================ the analyses ============================================

def hits(experts: np.ndarray, E: int) -> np.ndarray:
  """(N, E) 0/1: hits[n, e] = 1 when token n's top-k contains expert e."""
  experts = np.asarray(experts)
  out = np.zeros((experts.shape[0], E), dtype=np.int64)
  np.put_along_axis(out, experts.astype(np.int64), 1, axis=1)
  return out

def expert_load(experts: np.ndarray, E: int) -> np.ndarray:
  """(E,) share of the N tokens whose top-k contains expert e. Sums to k; uniform routing gives k/E for every e."""
  return hits(experts, E).mean(0)

def coactivation(experts: np.ndarray, E: int) -> np.ndarray:
  """(E, E) CoAct[i, j] = N(i, j) / N(i): of the tokens routed to expert i, the share also routed to expert j.

  N(i) counts tokens whose top-k contains i, N(i, j) those whose top-k contains both; every pair of the k chosen
  experts counts (k(k-1)/2 pairs per token), not only neighbouring slots. Rows of experts no token chose are 0.
  The diagonal (N(i, i) / N(i) = 1 by definition) is set to 0 so that it does not dominate a heatmap's scale."""
  h = hits(experts, E)
  both = h.T @ h                                                             # (E, E) N(i, j); diagonal N(i)
  n = np.diag(both).astype(np.float64)
  out = np.divide(both, n[:, None], out=np.zeros((E, E)), where=n[:, None] > 0)
  np.fill_diagonal(out, 0.0)
  return out

def domain_specialisation(experts: np.ndarray, E: int) -> np.ndarray:
  """(E,) DomainSpec(e, D) = N_k(e, D) / N_D for the rows of ONE domain's tokens: the expert load restricted to that
  domain. Uniform routing gives k/E; an expert at 2k/E sees its domain twice as often as chance."""
  return expert_load(experts, E)

def vocabulary_specialisation(experts: np.ndarray, token_ids: np.ndarray, E: int, min_count: int = 1
                              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """VocabSpec(e, x) = N_k(x, e) / N_x for every token id x occurring at least `min_count` times.

  token_ids (N,) gives the id each routing row is about: the input token at that position, or the next
  (ground-truth) token, whichever the caller wants to study. Returns (ids (U,), counts (U,), spec (U, E)), each
  row of spec in [0, 1] summing to k (uniform: k/E)."""
  token_ids = np.asarray(token_ids)
  ids, inverse, counts = np.unique(token_ids, return_inverse=True, return_counts=True)
  per_id = np.zeros((len(ids), E))
  np.add.at(per_id, inverse, hits(experts, E))                               # (U, E) N_k(x, e)
  spec = per_id / counts[:, None]
  keep = counts >= min_count
  return ids[keep], counts[keep], spec[keep]

def vocabulary_specialisation_score(experts: np.ndarray, token_ids: np.ndarray, E: int, min_count: int = 1) -> float:
  """One number per layer: for each token id, the share of its occurrences that went to its favourite expert,
  averaged over ids (unweighted). 1 = every id always goes to the same expert. A maximum is biased upward for rare
  ids (an id seen once scores 1 under any routing), so it is not k/E under uniform routing; raise `min_count`, and
  compare with the same score on a shuffled routing table (`shuffled_baseline`)."""
  _, _, spec = vocabulary_specialisation(experts, token_ids, E, min_count)
  return float(spec.max(1).mean()) if len(spec) else float("nan")

def shuffled_baseline(experts: np.ndarray, token_ids: np.ndarray, E: int, min_count: int = 1, seed: int = 0) -> float:
  """vocabulary_specialisation_score after shuffling which token each routing row belongs to: the score that the
  same token counts and the same expert loads give with no link between token and expert."""
  perm = np.random.default_rng(seed).permutation(len(token_ids))
  return vocabulary_specialisation_score(np.asarray(experts)[perm], token_ids, E, min_count)

def router_saturation(early: np.ndarray, final: np.ndarray) -> float:
  """(1/N) sum_n |top-k_early(n) ∩ top-k_final(n)| / k for the same N tokens at one layer. 1 = same expert sets."""
  early, final = np.asarray(early), np.asarray(final)
  k = final.shape[1]
  same = (early[:, :, None] == final[:, None, :]).any(2).sum(1)              # (N,) |intersection|, ids distinct
  return float(same.mean() / k)

def router_saturation_top1(early: np.ndarray, final: np.ndarray) -> float:
  """Share of tokens whose most probable expert (slot 0) is the same in both checkpoints."""
  return float((np.asarray(early)[:, 0] == np.asarray(final)[:, 0]).mean())

def busiest_ratio(experts: np.ndarray, E: int) -> float:
  """The busiest expert's load over the even share k/E (1 = perfectly balanced)."""
  k = np.asarray(experts).shape[1]
  return float(expert_load(experts, E).max() / (k / E))


# ============================================== figures ==============================================

def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt

def plot_routing_heatmap(tokens: list[str], experts: np.ndarray, weights: np.ndarray, E: int, path: Path,
                         title: str = "") -> Path:
  """One panel per layer: rows the prompt's tokens, columns the E experts, colour the router weight of each of the
  token's k chosen experts (blank = not chosen). experts, weights: (L, T, k)."""
  plt = _plt()
  L, T, _ = experts.shape
  grid = np.zeros((L, T, E))
  for l in range(L): np.put_along_axis(grid[l], experts[l].astype(np.int64), weights[l], axis=1)
  fig, axes = plt.subplots(1, L, figsize=(1.2 + 0.28 * E * L, 0.8 + 0.22 * T), sharey=True, squeeze=False)
  vmax = float(weights.max()) or 1.0
  for l, ax in enumerate(axes[0]):
    im = ax.imshow(np.ma.masked_equal(grid[l], 0), cmap="viridis", vmin=0, vmax=vmax, aspect="auto")
    ax.set_title(f"layer {l}", fontsize=9)
    ax.set_xticks(range(E)); ax.set_xticklabels(range(E), fontsize=6)
    ax.set_xlabel("expert", fontsize=8)
  axes[0, 0].set_yticks(range(T)); axes[0, 0].set_yticklabels([repr(t)[1:-1] for t in tokens], fontsize=7, family="monospace")
  fig.colorbar(im, ax=axes[0].tolist(), shrink=0.6, label="router weight")
  if title: fig.suptitle(title, fontsize=10)
  return _save(fig, path)

def plot_load_histogram(loads: np.ndarray, k: int, path: Path, title: str = "") -> Path:
  """Bars of expert_load per expert, one panel per layer (loads (L, E)), with the uniform share k/E as a line."""
  plt = _plt()
  L, E = loads.shape
  fig, axes = plt.subplots(1, L, figsize=(2.6 * L, 2.4), sharey=True, squeeze=False)
  for l, ax in enumerate(axes[0]):
    ax.bar(range(E), loads[l], color="tab:blue")
    ax.axhline(k / E, color="tab:red", ls="--", lw=1, label=f"uniform k/E = {k / E:.3f}")
    ax.set_title(f"layer {l}", fontsize=9); ax.set_xlabel("expert", fontsize=8)
    ax.set_xticks(range(0, E, max(1, E // 8)))
  axes[0, 0].set_ylabel("share of tokens")
  axes[0, 0].legend(fontsize=7, loc="upper left")
  if title: fig.suptitle(title, fontsize=10, y=1.04)          # above the panels' own titles
  return _save(fig, path)

def plot_coactivation(coact: np.ndarray, path: Path, title: str = "") -> Path:
  """The (E, E) co-activation matrix: row i, column j = share of expert i's tokens also routed to expert j."""
  plt = _plt()
  E = coact.shape[0]
  fig, ax = plt.subplots(figsize=(4.2, 3.6))
  im = ax.imshow(coact, cmap="magma", vmin=0, vmax=max(float(coact.max()), 1e-9))
  ax.set_xlabel("expert j"); ax.set_ylabel("expert i")
  ax.set_xticks(range(E)); ax.set_yticks(range(E))
  ax.tick_params(labelsize=6)
  fig.colorbar(im, ax=ax, label="N(i, j) / N(i)")
  if title: ax.set_title(title, fontsize=9)
  return _save(fig, path)

def plot_domain_specialisation(spec: dict[str, np.ndarray], k: int, path: Path, title: str = "") -> Path:
  """Grouped bars: for each expert, the share of each domain's tokens routed to it (spec: domain -> (E,)), with
  the uniform share k/E as a line."""
  plt = _plt()
  names = list(spec)
  E = len(next(iter(spec.values())))
  fig, ax = plt.subplots(figsize=(0.5 * E + 1.5, 2.6))
  w = 0.8 / len(names)
  for j, n in enumerate(names): ax.bar(np.arange(E) + (j - (len(names) - 1) / 2) * w, spec[n], w, label=n)
  ax.axhline(k / E, color="black", ls="--", lw=1, label="uniform k/E")
  ax.set_xticks(range(E)); ax.set_xlabel("expert"); ax.set_ylabel("share of the domain's tokens")
  ax.legend(fontsize=7, ncol=len(names) + 1)
  if title: ax.set_title(title, fontsize=9)
  return _save(fig, path)

def plot_saturation(steps: list[int], topk: np.ndarray, top1: np.ndarray, total_steps: int, path: Path) -> Path:
  """Router saturation against the final checkpoint, one line per layer; topk, top1: (checkpoints, L)."""
  plt = _plt()
  fig, axes = plt.subplots(1, 2, figsize=(7, 2.6), sharey=True)
  x = 100 * np.asarray(steps) / total_steps
  for l in range(topk.shape[1]):
    axes[0].plot(x, topk[:, l], marker="o", label=f"layer {l}")
    axes[1].plot(x, top1[:, l], marker="o", label=f"layer {l}")
  for ax, t in zip(axes, ("top-k saturation", "top-1 saturation")):
    ax.set_title(t, fontsize=9); ax.set_xlabel("% of training"); ax.set_ylim(0, 1.02)
  axes[0].legend(fontsize=7)
  return _save(fig, path)

def plot_training(log: dict, path: Path, window: int = 10) -> Path:
  """A training run from its train_log.json (demo/train.py): the loss terms per step (CE, alpha * LB, beta * Z,
  smoothed over 25 steps), and per layer the load of each expert over training as a share of the uniform one
  (colour; 1 = balanced), from the full load logged every few steps, averaged over `window` consecutive records."""
  plt = _plt()
  loads = log.get("load_every_10_steps") or {}
  steps = sorted(loads, key=int)
  grid = np.array([loads[s] for s in steps]) if steps else np.zeros((0, 0, 0))      # (records, L, E)
  L, E = grid.shape[1:] if steps else (0, 0)
  if len(grid) >= window: grid = grid[: len(grid) // window * window].reshape(-1, window, L, E).mean(1)
  fig, axes = plt.subplots(1, 1 + L, figsize=(3.6 + 2.2 * L, 2.8), squeeze=False, layout="constrained",
                           gridspec_kw={"width_ratios": [1.6] + [1] * L})
  smooth = lambda v: np.convolve(v, np.ones(25) / 25, mode="valid") if len(v) >= 25 else np.asarray(v)
  ax = axes[0, 0]
  ax.plot(smooth(log["ce_every_step"]), label="CE")
  if log.get("alpha_lb"): ax.plot(smooth(log["alpha_lb"] * np.asarray(log["lb_every_step"])), label=f"{log['alpha_lb']} x LB")
  if log.get("beta_z"): ax.plot(smooth(log["beta_z"] * np.asarray(log["z_every_step"])), label=f"{log['beta_z']} x Z")
  ax.set_yscale("log"); ax.set_xlabel("step"); ax.set_title("loss terms (nats)", fontsize=9)
  ax.legend(fontsize=7, loc="center right")
  for l in range(L):
    ax = axes[0, 1 + l]
    im = ax.imshow(grid[:, l, :].T * E, aspect="auto", cmap="coolwarm", vmin=0, vmax=2, interpolation="nearest",
                   extent=(0, int(steps[-1]), E - 0.5, -0.5))
    ax.set_title(f"layer {l}", fontsize=9); ax.set_xlabel("step")
    ax.set_yticks(range(0, E, max(1, E // 8)))
    if l == 0: ax.set_ylabel("expert")
  if L: fig.colorbar(im, ax=axes[0, 1:].tolist(), shrink=0.8, label="load / uniform")
  return _save(fig, path)

def _save(fig, path: Path) -> Path:
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120, bbox_inches="tight", metadata={"Software": None})
  _plt().close(fig)
  return path


# ===================================== routing tables from a model =====================================

def routing_tables(model, ids: np.ndarray, batch: int = 8) -> tuple[np.ndarray, np.ndarray]:
  """Run `model` (an olmoe.Olmoe) on windows ids (B, T) and return its routing tables experts, weights: (L, B*T, k),
  rows in window order. The one function here that runs a model (no gradients, in batches)."""
  from tinygrad import Tensor
  exps, wts = [], []
  for b in range(0, len(ids), batch):
    _, r = model(Tensor(np.asarray(ids[b:b + batch], dtype=np.int32)), return_routing=True)
    exps.append(np.stack([i.numpy() for i in r.experts])); wts.append(np.stack([w.float().numpy() for w in r.weights]))
  return np.concatenate(exps, 1).astype(np.int64), np.concatenate(wts, 1)
