"""olmoe.py and flexolmo.py lowered for GPU targets, run in tinygrad's Python emulator, against the CPU.

tinygrad lowers each kernel for the device's renderer: for a GPU the loops become a grid of threads with local
memory, and matrix products whose sizes fit become tensor-core (WMMA) instructions, so the kernels that run there
are not the ones the CPU tests run. tinygrad's PYTHON device executes those kernels' instructions in an interpreter
(`DEV=PYTHON::<arch>` picks the target), so a machine without the GPU can check that the model's code gives the
same numbers when lowered for it. For each target one child process (the device is fixed when tinygrad is
imported) builds a tiny OLMoE and a tiny FlexOlmo from the same numpy weights as a CPU child and checks:

  - forward: the logits of a 16-token prompt (16 positions: the attention products fit the tensor cores) equal the
    CPU's within 1e-4;
  - generation: greedy `generate` (a left-padded prefill, then compiled decode steps) yields the CPU's tokens;
  - FlexOlmo opt-out: with expert "1" of 3 opted out, the logits equal the CPU's with the same opt-out;
  - olmoe_speedups' accelerations of the CPU runtime stay off there (tinygrad replays the compiled steps itself).

Targets:

  - `PYTHON::sm_80` (CUDA, Ampere) with ALLOW_TF32=1: tinygrad puts fp32 products on the tf32 tensor cores only
    when allowed to. The emulator does not round the inputs to tf32, so this checks the tensor cores' data layout,
    not the rounding of real tf32 hardware (about 1e-3 relative, which is why tinygrad leaves it off by default).
  - `PYTHON::METAL` (Apple GPUs, whose simdgroup matrices take fp32 as it is). The arch is case-sensitive:
    `PYTHON::metal` silently gives the generic Python target, without tensor cores, so the child reports the
    target its renderer was built for and the test checks it.

Each child takes 13-25 s on two cores (mostly lowering the kernels, which the emulated targets then interpret in
Python); the CPU reference runs beside the first target. Kernels are lowered with tinygrad's default optimiser (not
NOOPT, which would leave the tensor cores out), and each child gets its own cache database, so nothing lowered here
is read from or written to the user's caches.
"""
import json, os, subprocess, sys, time
from pathlib import Path
import numpy as np
import pytest
from conftest import ROOT
import olmoe, flexolmo

CONFIG = dict(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=1, num_attention_heads=4,
              num_experts=4, num_experts_per_tok=2, max_position_embeddings=64, pad_token_id=1, eos_token_id=0)
FLEX_CONFIG = dict(CONFIG, num_experts=3)
FORWARD_IDS = [[(7 * j + 3) % 64 for j in range(16)]]    # (1, 16)
PROMPT = [3, 17, 42, 5, 9, 60, 11]                       # left-padded to 16 positions by generate
OPT_OUT = ["1"]

TARGETS = {   # name -> environment of the child; `device` is what the renderer reports as its target
  "sm_80": dict(env={"DEV": "PYTHON::sm_80", "ALLOW_TF32": "1"}, device="CUDA"),
  "METAL": dict(env={"DEV": "PYTHON::METAL"}, device="METAL"),
}
# settings inherited from the caller's environment that would change which kernels are lowered, or what is printed
TINYGRAD_SETTINGS = ("DEV", "NOOPT", "BEAM", "TC", "TC_OPT", "TC_SELECT", "ALLOW_TF32", "DEBUG", "JIT", "CACHELEVEL")
TIMEOUT = 600   # seconds per child; each takes 13-25 s

CHILD = r'''
import json, sys, time
import numpy as np
from tinygrad import Device, Tensor
from tinygrad.uop.ops import Ops
import tinygrad.codegen
import olmoe, flexolmo, olmoe_speedups

spec, weights = json.loads(sys.argv[1]), np.load(sys.argv[2])
start = time.perf_counter()

def with_weights(model, prefix):
  for name, t in model.parameters().items():
    a = weights[prefix + name]
    assert a.shape == t.shape, f"{name}: stored {a.shape}, model {t.shape}"
    t.assign(Tensor(a, device=t.device)).realize()
  return model

def tensor_core_kernels():
  return sum(Ops.WMMA in {u.op for u in p.toposort()} for p in tinygrad.codegen.to_program_cache.values())

renderer = Device[Device.DEFAULT].renderer
out = {"device": Device.DEFAULT, "target": repr(renderer.target), "target_device": renderer.target.device}
model = with_weights(olmoe.Olmoe(olmoe.OlmoeConfig(**spec["config"])), "olmoe.")
t = time.perf_counter()
out["logits"] = model(Tensor(spec["forward_ids"])).numpy().tolist()
out["forward_s"], out["forward_tensor_core_kernels"] = time.perf_counter() - t, tensor_core_kernels()
t = time.perf_counter()
out["tokens"] = [s.tokens for s in olmoe.generate(model, [spec["prompt"]], max_new_tokens=4, stop_ids=())]
out["generate_s"] = time.perf_counter() - t
out["speedups"] = olmoe_speedups.usable(Device.DEFAULT)
out["replays"] = sorted({type(j.captured).__name__ for j in [*model._prefills.values(), *model._decoders.values()] if j.captured is not None})
flex = with_weights(flexolmo.FlexOlmo(flexolmo.FlexOlmoConfig(**spec["flex_config"])), "flex.")
out["enabled"] = flex.select_experts(opt_out=spec["opt_out"])
t = time.perf_counter()
out["flex_logits"] = flex(Tensor(spec["forward_ids"])).numpy().tolist()
out["flex_s"], out["total_s"] = time.perf_counter() - t, time.perf_counter() - start
print(json.dumps(out))
'''


def random_weights() -> dict[str, np.ndarray]:
  """Weights for both tiny models, named "olmoe.<parameter>" and "flex.<parameter>": norms perturbed away from 1 and
  matrices at std 0.3, so that the norms matter and attention and routing are far from uniform."""
  rng, out = np.random.default_rng(0), {}
  for prefix, model in (("olmoe.", olmoe.Olmoe(olmoe.OlmoeConfig(**CONFIG))),
                        ("flex.", flexolmo.FlexOlmo(flexolmo.FlexOlmoConfig(**FLEX_CONFIG)))):
    for name, t in model.parameters().items():   # shapes only: the models' own random init is never realized
      a = 1 + 0.2 * rng.standard_normal(t.shape) if "norm" in name else 0.3 * rng.standard_normal(t.shape)
      out[prefix + name] = a.astype(np.float32)
  return out


class Child:
  """One child process running CHILD on a device, its output going to files (a pipe left unread could fill up and
  stall a child running beside another)."""
  def __init__(self, name: str, env: dict[str, str], folder: Path, weights: Path):
    self.name, self.folder = name, folder
    spec = dict(config=CONFIG, flex_config=FLEX_CONFIG, forward_ids=FORWARD_IDS, prompt=PROMPT, opt_out=OPT_OUT)
    base = {k: v for k, v in os.environ.items() if k not in TINYGRAD_SETTINGS}
    env = dict(base, **env, CACHEDB=str(folder / "cache.db"), PYTHONPATH=str(ROOT))
    self.stdout, self.stderr = open(folder / "stdout", "w"), open(folder / "stderr", "w")
    self.start = time.perf_counter()
    self.proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(spec), str(weights)], env=env, cwd=folder,
                                 stdout=self.stdout, stderr=self.stderr, text=True)
    self._result: dict | None = None

  def result(self) -> dict:
    """The child's JSON result (waiting for it), with its wall time in "wall_s"; fails with the child's stderr."""
    if self._result is not None: return self._result
    timed_out = False
    try: self.proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
      timed_out = True
      self.proc.kill(); self.proc.wait()
    wall = time.perf_counter() - self.start
    self.stdout.close(); self.stderr.close()
    stdout, stderr = (self.folder / "stdout").read_text(), (self.folder / "stderr").read_text()
    if self.proc.returncode != 0 or not stdout.strip():
      how = f"was stopped after {TIMEOUT} s" if timed_out else f"exited with status {self.proc.returncode}"
      pytest.fail(f"the {self.name} child {how}\n--- stderr (end) ---\n{stderr[-6000:]}", pytrace=False)
    self._result = dict(json.loads(stdout.strip().splitlines()[-1]), wall_s=wall)
    return self._result

  def stop(self):
    if self.proc.poll() is None: self.proc.kill(); self.proc.wait()
    self.stdout.close(); self.stderr.close()


class Children:
  """The children of this module, over one set of weights. The CPU reference starts at once, so that it runs beside
  the first target."""
  def __init__(self, root: Path):
    self.root, self.weights, self.running = root, root / "weights.npz", []
    np.savez(self.weights, **random_weights())
    self.cpu = self.start("CPU", {"DEV": "CPU"})

  def start(self, name: str, env: dict[str, str]) -> Child:
    (folder := self.root / name).mkdir()
    self.running.append(child := Child(name, env, folder, self.weights))
    return child


@pytest.fixture(scope="module")
def children(tmp_path_factory):
  runs = Children(tmp_path_factory.mktemp("backends"))
  yield runs
  for child in runs.running: child.stop()


@pytest.mark.parametrize("target", list(TARGETS))
def test_emulated_gpu_target_matches_the_cpu(children, target):
  got = children.start(target, TARGETS[target]["env"]).result()
  ref = children.cpu.result()
  where = f"{target} ({got['target']}, {got['wall_s']:.0f} s)"
  assert got["device"] == "PYTHON" and got["target_device"] == TARGETS[target]["device"], \
    f"{target}: the child ran on {got['device']} lowering for {got['target']}, not the emulated target"
  assert got["forward_tensor_core_kernels"] > 0, f"{where}: no kernel of the forward pass uses the tensor cores"
  np.testing.assert_allclose(np.array(got["logits"]), np.array(ref["logits"]), rtol=0, atol=1e-4,
                             err_msg=f"{where}: OLMoE logits differ from the CPU's")
  assert got["tokens"] == ref["tokens"], f"{where}: greedy tokens {got['tokens']}, CPU {ref['tokens']}"
  # olmoe_speedups stay off on other devices: their steps are replayed by tinygrad itself (on the CPU, planned)
  assert not got["speedups"] and got["replays"] == ["CapturedJit"], f"{where}: {got['replays']}"
  assert ref["speedups"] and ref["replays"] == ["PlannedCapturedJit"]
  assert got["enabled"] == ref["enabled"] == ["0", "2"], f"{where}: enabled experts {got['enabled']}"
  np.testing.assert_allclose(np.array(got["flex_logits"]), np.array(ref["flex_logits"]), rtol=0, atol=1e-4,
                             err_msg=f"{where}: FlexOlmo logits with expert 1 opted out differ from the CPU's")
