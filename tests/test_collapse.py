"""demo/collapse.py, the page "Router collapse, live" (docs/collapse.md) and its cached logs in demo/collapse/: bad
input ends in one line and exit code 2, the cached logs are consistent with themselves and with what the page says,
and a few steps of the bias-balancing run move the bias as sign(mean load - load) says."""
import json, math, subprocess, sys
from pathlib import Path
import numpy as np
import pytest
from conftest import ROOT, TEXTS

sys.path.insert(0, str(ROOT / "demo"))
import collapse  # noqa: E402

LOGS = ROOT / "demo" / "collapse"
SCRIPT = ROOT / "demo" / "collapse.py"


def one_line_error(args: list[str]) -> str:
  r = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert r.returncode == 2 and r.stdout == "", (r.returncode, r.stderr[-2000:])
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
  return lines[0]

def test_bad_input_is_one_line_and_exit_2(tmp_path):
  assert "--runs" in one_line_error(["--runs", "off,nothing"])
  assert "--steps" in one_line_error(["--steps", "0"])
  assert "demo/data.py" in one_line_error(["--data", str(tmp_path / "none")])
  assert "setup.json" in one_line_error(["--out", str(tmp_path), "--plot", str(tmp_path / "fig")])


# ============================================ the cached logs ============================================

@pytest.fixture(scope="module")
def logs():
  if not (LOGS / "setup.json").exists(): pytest.skip("no cached logs in demo/collapse/ (python demo/collapse.py)")
  return collapse.read_logs(LOGS)

def test_cached_logs_are_consistent(logs):
  setup = json.loads((LOGS / "setup.json").read_text())
  L, E, k = setup["arch"]["num_hidden_layers"], setup["arch"]["num_experts"], setup["arch"]["num_experts_per_tok"]
  for kind, log in logs.items():
    pairs, tokens = np.array(log["pairs"]), setup["batch_size"] * (setup["seq_len"] + 1)
    assert pairs.shape == (setup["steps"], L, E), kind
    assert (pairs.sum(-1) == tokens * k).all() and (pairs >= 0).all() and (pairs <= tokens).all()   # once per expert
    np.testing.assert_allclose(log["load"].sum(-1), 1, atol=1e-12)                 # the shares read_logs gives
    assert all(len(log[n]) == setup["steps"] for n in ("ce", "lb", "z"))
    assert (log["num_experts"], log["k"]) == (E, k)
    # the per-layer LB (balanced value 1) is at least ~1 when f is near P, at most E/k
    assert all(0.5 < v <= E / k + 1e-3 for v in log["lb"]), kind
  assert (logs["off"]["alpha"], logs["lb"]["alpha"], logs["bias"]["alpha"]) == (0, setup["alpha"], 0)
  assert logs["bias"]["gamma"] == setup["gamma"] and logs["off"]["gamma"] == logs["lb"]["gamma"] == 0
  # the bias run's biases move by gamma per step, as sign(mean load - load), from 0: by numpy on the pair counts. An
  # expert with exactly the mean load (sign 0 in exact arithmetic) may move either way: olmoe.py's fp32 mean of the
  # E shares is not exactly 1/E
  bias, pairs = np.array(logs["bias"]["bias"]), np.array(logs["bias"]["pairs"])
  step = np.diff(bias, axis=0, prepend=np.zeros((1, L, E)))
  tie = pairs * E == pairs.sum(-1, keepdims=True)
  np.testing.assert_allclose(step[~tie], (setup["gamma"] * np.sign(pairs.sum(-1, keepdims=True) - pairs * E))[~tie], atol=1e-3)
  assert (np.abs(step[tie]) <= setup["gamma"] + 1e-3).all()


def idle(load: np.ndarray) -> int:
  """Experts (of all layers) whose mean share over these steps, load (steps, L, E), is under 1% of uniform."""
  return int((load.mean(0) * load.shape[-1] < 0.01).sum())

def summary(log: dict, last: int = 50) -> dict:
  """By hand from a log, over the last `last` steps: idle experts, the least and most used expert's mean load over
  uniform, the busiest expert on one step over uniform (mean), the mean entropy of the load, the cross-entropy."""
  load = np.array(log["load"])[-last:]                                            # (last, L, E)
  E = load.shape[-1]
  p = np.clip(load, 1e-12, None)
  return {"idle": idle(load), "least": float((load.mean(0) * E).min()), "most": float((load.mean(0) * E).max()),
          "busiest": float((load.max(-1) * E).mean()), "entropy": float((-(p * np.log(p)).sum(-1)).mean()),
          "ce": float(np.mean(log["ce"][-last:]))}

def test_the_page_states_what_the_logs_say(logs):
  """What docs/collapse.md says of the runs, checked on the logs by hand; and its tables (a snippet) recomputed."""
  text = " ".join((ROOT / "docs" / "collapse.md").read_text(encoding="utf-8").replace("\\(", "").replace("\\)", "").split())
  setup = logs["off"]["setup"]
  assert f"{setup['steps']} steps" in text and f"({setup['batch_size']} windows of {setup['seq_len']} tokens" in text
  assert f"| `bias` | 0 | \\gamma = {setup['gamma']} |" in text and f"| `lb` | {setup['alpha']} |" in text
  assert f"beta = {setup['beta']}" in text and "over the last 50 steps" in text and "window of 25 steps" in text
  assert setup["lr"] == 3e-3 and "learning rate of 3 \\cdot 10^{-3}" in text
  s = {kind: summary(log) for kind, log in logs.items()}
  off, lb, bias = (np.array(logs[k]["load"]) for k in ("off", "lb", "bias"))
  L, E = off.shape[1:]
  windows = lambda load: [idle(load[a:a + 25]) for a in range(0, len(load), 25)]
  # without balancing: collapse within a few dozen steps, idle experts in every layer to the end, some revived
  entropy = lambda load: (-(np.clip(load, 1e-12, None) * np.log(np.clip(load, 1e-12, None))).sum(-1)).mean()
  assert entropy(off[20:40]) < entropy(off[:1]) - 0.5
  assert idle(off[25:50]) >= L * E // 4                                           # "a large part of the experts"
  early, late = off[25:50].mean(0) * E < 0.01, off[-50:].mean(0) * E < 0.01
  assert (early & ~late).any() and (late & ~early).any()                          # "revives a few ... starves others"
  assert (late.sum(-1) >= 1).all()                                                 # "every layer has idle experts"
  # the loss: early steps like the first run, idle experts past half of the run, none at the end
  assert windows(lb)[1] > 0 and 0 < idle(lb[125:150]) <= 8 and s["lb"]["idle"] == 0 and s["lb"]["least"] < 0.25
  # the bias: no idle expert in any window, mean loads close to uniform (far closer than the loss's), per step as loaded
  assert max(windows(bias)) == 0 and s["bias"]["idle"] == 0
  assert 0.8 < s["bias"]["least"] and s["bias"]["most"] < 1.3 and s["lb"]["least"] < s["bias"]["least"] - 0.5
  assert abs(s["bias"]["busiest"] - s["lb"]["busiest"]) < 0.3 and abs(s["bias"]["entropy"] - s["lb"]["entropy"]) < 0.1
  assert s["off"]["busiest"] > 1.5 * max(s["lb"]["busiest"], s["bias"]["busiest"])
  assert s["off"]["ce"] > max(s["lb"]["ce"], s["bias"]["ce"])                      # "worse, by a small margin"
  out = subprocess.run([sys.executable, "-c", "import runpy, sys; sys.path[:0] = ['docs/snippets', '.']; "
                        "runpy.run_path('docs/snippets/collapse_runs.py')"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120).stdout
  cells = lambda prefix: [[c.strip() for c in l.strip().strip("|").split("|")] for l in out.splitlines() if l.startswith(prefix)]
  for kind in ("off", "lb", "bias"):
    v = s[kind]
    assert cells(f"| {kind} ")[0][1:6] == [f"{v['idle']} of {L * E}", f"{v['least']:.2f} / {v['most']:.2f}",
                                           f"{v['busiest']:.2f}", f"{v['entropy']:.2f}", f"{v['ce']:.2f}"], kind
  per_window = [[int(c) for c in row[1:]] for row in cells("| ") if "–" in row[0]]   # rows: windows, columns: runs
  assert per_window == [list(w) for w in zip(*(windows(x) for x in (off, lb, bias)))]


# ============================================ a few steps of the bias run ============================================

def test_a_few_bias_steps_move_the_bias_by_sign_of_mean_minus_load(tmp_path):
  """Three steps of the bias run on a tiny model: the bias starts at 0 and after each step has moved by
  gamma * sign(1/E - load_e), with the load counted in numpy from the experts the step chose."""
  data = tmp_path / "data"; data.mkdir()
  for i, d in enumerate(("prose", "code", "math")):
    (data / f"{d}.train.txt").write_text("<|endoftext|>".join(TEXTS[i::3] * 20), encoding="utf-8")
  setup = {**collapse.SETUP, "steps": 3, "batch_size": 2, "seq_len": 16, "gamma": 0.05,
           "arch": dict(num_hidden_layers=1, hidden_size=32, intermediate_size=16, num_attention_heads=2,
                        num_experts=4, num_experts_per_tok=2)}
  log = collapse.train_run("bias", data, setup, keep_choices=True)
  bias, pairs = np.array(log["bias"]), np.array(log["pairs"])                      # (3, L, E) each
  assert bias.shape == pairs.shape == (3, 1, 4)
  chosen = np.array(log["chosen"])                                                 # (3, L, N, k) expert ids per step
  counts = np.stack([[np.bincount(c.ravel(), minlength=4) for c in step] for step in chosen])
  assert (pairs == counts).all()
  by_hand = counts / counts.sum(-1, keepdims=True)
  step = np.diff(bias, axis=0, prepend=np.zeros((1, 1, 4)))
  tie = counts * 4 == counts.sum(-1, keepdims=True)                              # exactly the mean: either way (fp32)
  np.testing.assert_allclose(step[~tie], (0.05 * np.sign(0.25 - by_hand))[~tie], atol=1e-6)
  assert (np.abs(step[tie]) <= 0.05 + 1e-6).all()
  assert np.abs(bias[-1]).max() > 0
