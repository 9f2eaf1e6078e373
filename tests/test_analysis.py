"""demo/analysis.py on routing tables small enough to count by hand (every expected number is worked out in the
comments, not produced by the code under test)."""
import sys
from pathlib import Path
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "demo"))
import analysis as A

# 4 tokens, E = 4 experts, k = 2 slots (slot 0 = most probable). Expert sets per token:
#   t0 {0, 1}   t1 {1, 2}   t2 {0, 2}   t3 {0, 1}          expert 3 is never chosen
TABLE = np.array([[0, 1], [1, 2], [2, 0], [1, 0]])
E = 4


def test_expert_load_counts_tokens_per_expert():
  # e0 in t0, t2, t3 -> 3/4; e1 in t0, t1, t3 -> 3/4; e2 in t1, t2 -> 2/4; e3 never -> 0. Sums to k = 2.
  np.testing.assert_allclose(A.expert_load(TABLE, E), [0.75, 0.75, 0.5, 0.0])
  assert A.expert_load(TABLE, E).sum() == pytest.approx(2.0)
  # the busiest expert (3/4) over the even share k/E = 2/4
  assert A.busiest_ratio(TABLE, E) == pytest.approx(1.5)


def test_coactivation_over_all_pairs():
  # row i: tokens routed to i; column j: share of them also routed to j.
  #   N(0) = 3 (t0, t2, t3): with 1 in t0, t3 -> 2/3; with 2 in t2 -> 1/3
  #   N(1) = 3 (t0, t1, t3): with 0 in t0, t3 -> 2/3; with 2 in t1 -> 1/3
  #   N(2) = 2 (t1, t2):     with 0 in t2 -> 1/2;     with 1 in t1 -> 1/2
  #   N(3) = 0: a row of zeros. Diagonal set to 0.
  expected = [[0, 2 / 3, 1 / 3, 0], [2 / 3, 0, 1 / 3, 0], [1 / 2, 1 / 2, 0, 0], [0, 0, 0, 0]]
  np.testing.assert_allclose(A.coactivation(TABLE, E), expected)


def test_coactivation_counts_non_adjacent_slots():
  # k = 3: token a chose 0, 1, 2 (0 and 2 are NOT neighbouring slots); token b chose 3, 1, 0 (3 and 0 neither).
  # All pairs: N(0) = 2, N(0, 2) = 1 -> 1/2; N(3) = 1, N(3, 0) = 1 -> 1. (The adjacent-pairs script would give 0, 0.)
  c = A.coactivation(np.array([[0, 1, 2], [3, 1, 0]]), 4)
  assert c[0, 2] == pytest.approx(0.5) and c[3, 0] == pytest.approx(1.0)
  assert c[0, 1] == pytest.approx(1.0)                    # 0 and 1 together in both of 0's tokens
  assert c[2, 3] == 0.0 and c[3, 2] == 0.0               # 2 and 3 never share a token


def test_domain_specialisation_against_uniform():
  # domain A = t0, t1 ({0,1}, {1,2}); domain B = t2, t3 ({0,2}, {0,1}). Uniform share k/E = 1/2.
  a, b = A.domain_specialisation(TABLE[:2], E), A.domain_specialisation(TABLE[2:], E)
  np.testing.assert_allclose(a, [0.5, 1.0, 0.5, 0.0])    # every A token went to expert 1: twice the uniform share
  np.testing.assert_allclose(b, [1.0, 0.5, 0.5, 0.0])    # every B token went to expert 0


def test_vocabulary_specialisation():
  # token ids of the 4 rows: 5, 5, 5, 7
  #   id 5 (t0, t1, t2): sets {0,1}, {1,2}, {0,2} -> e0 2/3, e1 2/3, e2 2/3, e3 0
  #   id 7 (t3):         set {0,1}                -> e0 1,   e1 1,   e2 0,   e3 0
  ids, counts, spec = A.vocabulary_specialisation(TABLE, np.array([5, 5, 5, 7]), E)
  assert ids.tolist() == [5, 7] and counts.tolist() == [3, 1]
  np.testing.assert_allclose(spec, [[2 / 3, 2 / 3, 2 / 3, 0], [1, 1, 0, 0]])
  # score: favourite expert's share per id, averaged over ids: (2/3 + 1) / 2 = 5/6; ids seen >= 2 times: only 5 -> 2/3
  assert A.vocabulary_specialisation_score(TABLE, np.array([5, 5, 5, 7]), E) == pytest.approx(5 / 6)
  assert A.vocabulary_specialisation_score(TABLE, np.array([5, 5, 5, 7]), E, min_count=2) == pytest.approx(2 / 3)


def test_vocabulary_specialisation_score_and_its_shuffled_baseline():
  """Two ids, 50 occurrences each, id 0 always to expert 0 and id 1 always to expert 1 (k = 1, E = 2): the score is 1;
  shuffling the rows across tokens keeps the loads (half each) and drops it toward 1/2. An id seen once scores 1
  under any routing, which min_count leaves out."""
  ids = np.repeat([0, 1], 50)
  experts = ids.reshape(-1, 1)
  assert A.vocabulary_specialisation_score(experts, ids, 2) == 1.0
  assert 0.5 <= A.shuffled_baseline(experts, ids, 2) < 0.7
  ids3, experts3 = np.append(ids, 7), np.append(experts, [[1]], 0)
  assert A.vocabulary_specialisation_score(experts3, ids3, 2, min_count=2) == 1.0
  assert A.vocabulary_specialisation(experts3, ids3, 2)[1][-1] == 1           # id 7: one occurrence


def test_router_saturation():
  early = np.array([[0, 1], [1, 2], [3, 2], [1, 0]])
  final = np.array([[0, 1], [2, 1], [0, 2], [1, 3]])
  # |early ∩ final| per token: {0,1}->2, {1,2}->2 (order does not matter), {2}->1, {1}->1; (2+2+1+1) / (4*2) = 0.75
  assert A.router_saturation(early, final) == pytest.approx(0.75)
  # slot 0: early 0, 1, 3, 1 vs final 0, 2, 0, 1 -> t0 and t3 agree -> 0.5
  assert A.router_saturation_top1(early, final) == pytest.approx(0.5)
  assert A.router_saturation(final, final) == 1.0


def test_figures_are_written(tmp_path):
  pytest.importorskip("matplotlib")
  experts = np.stack([TABLE, TABLE[::-1]])                              # (L=2, T=4, k=2)
  weights = np.full(experts.shape, 0.4)
  paths = [A.plot_routing_heatmap(["a", "b", "\n", "d"], experts, weights, E, tmp_path / "heat.png"),
           A.plot_load_histogram(np.stack([A.expert_load(t, E) for t in experts]), 2, tmp_path / "load.png"),
           A.plot_coactivation(A.coactivation(TABLE, E), tmp_path / "coact.png"),
           A.plot_domain_specialisation({"x": A.expert_load(TABLE, E)}, 2, tmp_path / "dom.png"),
           A.plot_saturation([1, 2], np.array([[0.5, 0.6], [0.7, 0.8]]), np.array([[0.4, 0.5], [0.6, 0.7]]), 4,
                             tmp_path / "sat.png")]
  for p in paths: assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
