"""Malformed model folders, made by seeded random edits of a valid one, through `olmoe.load` and `flexolmo.load`
(1,000 cases) and through the command lines (1,000 cases run in this process, and a sample as separate processes).

Through the API every case must end in an OlmoeError (the one line the command line prints) or in a model whose
every tensor has the shape its config implies; through the command lines, in exit code 2 with one `error:` line or
in a run that prints its text (or, for `merge`, writes a folder that loads). Any other exception is a failure, and
so is a case that allocates more than a small fixed size (a limit on the process's data segment, RLIMIT_DATA). The edits are the ones a download or an editor can
make: truncation at section boundaries and at random points, flipped bytes in the safetensors header, header
entries with another shape, dtype or byte range, config.json values of the wrong type or range, tokenizer.json
cut or given values of the wrong type, files missing, empty, or replaced by folders."""
import contextlib, io, json, random, resource, shutil, struct, time
from pathlib import Path
import numpy as np
import pytest
from conftest import make_tokenizer_json
import olmoe, flexolmo
from olmoe_checkpoint import read_raw, to_raw, write_safetensors

CASES = 1000
PEAK = 256 * 2 ** 20   # bytes a case may allocate beyond what the process holds; the valid folder is about 40 kB
CONFIG = dict(model_type="olmoe", vocab_size=320, hidden_size=8, intermediate_size=4, num_hidden_layers=1,
              num_attention_heads=2, num_experts=3, num_experts_per_tok=2, max_position_embeddings=32,
              eos_token_id=0, pad_token_id=1)
ODD_VALUES = ["8", 8.5, -8, 0, 2 ** 40, None, True, [8], {"a": 8}, "", float("nan")]


def valid_folder(root: Path) -> Path:
  """A tiny OLMoE checkpoint in transformers' layout (per-expert keys), written with this project's writer."""
  rng, D, I, E, V = np.random.default_rng(0), 8, 4, 3, 320
  shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,), "lm_head.weight": (V, D)}
  p = "model.layers.0."
  shapes.update({p + f"self_attn.{n}.weight": (D, D) for n in ("q_proj", "k_proj", "v_proj", "o_proj")})
  shapes.update({p + n: (D,) for n in ("self_attn.q_norm.weight", "self_attn.k_norm.weight", "input_layernorm.weight",
                                       "post_attention_layernorm.weight")})
  shapes[p + "mlp.gate.weight"] = (E, D)
  for e in range(E):
    shapes.update({p + f"mlp.experts.{e}.gate_proj.weight": (I, D), p + f"mlp.experts.{e}.up_proj.weight": (I, D),
                   p + f"mlp.experts.{e}.down_proj.weight": (D, I)})
  folder = root / "valid"
  folder.mkdir()
  write_safetensors(folder / "model.safetensors",
                    {k: to_raw(rng.standard_normal(s).astype(np.float32), "F32") for k, s in shapes.items()})
  (folder / "config.json").write_text(json.dumps(CONFIG))
  make_tokenizer_json(folder)
  return folder


KINDS = ["cut", "cut_boundary", "flip_header", "shape", "dtype", "offsets", "config", "config_drop", "tokenizer_cut",
         "tokenizer_value", "missing", "empty", "folder"]


def mutate(folder: Path, rng: random.Random) -> str:
  """Apply one random edit to the copy in `folder`; returns its kind and what was done, `kind: what`."""
  kind = rng.choice(KINDS)
  return f"{kind}: {edit(folder, rng, kind)}"


def edit(folder: Path, rng: random.Random, kind: str) -> str:
  st, cfg, tok = folder / "model.safetensors", folder / "config.json", folder / "tokenizer.json"
  blob = bytearray(st.read_bytes())
  (n,) = struct.unpack("<Q", blob[:8])
  header = json.loads(blob[8:8 + n])
  keys = [k for k in header if k != "__metadata__"]
  def write_header(h):
    head = json.dumps(h).encode()
    head += b" " * (-len(head) % 8)
    st.write_bytes(struct.pack("<Q", len(head)) + head + bytes(blob[8 + n:]))
  if kind == "cut":
    at = rng.randrange(len(blob)); st.write_bytes(bytes(blob[:at])); return f"safetensors cut at {at}"
  if kind == "cut_boundary":
    bounds = [0, 8, 8 + n] + [8 + n + header[k]["data_offsets"][i] for k in keys for i in (0, 1)]
    at = rng.choice(bounds) + rng.choice([-1, 0, 1]); st.write_bytes(bytes(blob[:max(at, 0)]))
    return f"safetensors cut at boundary {at}"
  if kind == "flip_header":
    at = rng.randrange(8 + n); blob[at] ^= 1 << rng.randrange(8); st.write_bytes(bytes(blob))
    return f"bit flipped in header byte {at}"
  k = rng.choice(keys)
  if kind == "shape":
    shape = list(header[k]["shape"]); d = rng.randrange(len(shape))
    shape[d] = rng.choice([shape[d] + 1, shape[d] - 1, 0, shape[d] * 2]); header[k]["shape"] = shape
    write_header(header); return f"{k} shape {shape}"
  if kind == "dtype":
    header[k]["dtype"] = rng.choice(["F32", "F16", "I64", "F99", 7, None]); write_header(header)
    return f"{k} dtype {header[k]['dtype']!r}"
  if kind == "offsets":
    a, b = header[k]["data_offsets"]
    header[k]["data_offsets"] = rng.choice([[a, b - 2], [a + 2, b], [a - 2, b - 2], [b, a], [a, 10 ** 12], [a], "x"])
    write_header(header); return f"{k} data_offsets {header[k]['data_offsets']!r}"
  if kind in ("config", "config_drop"):
    c = json.loads(cfg.read_text()); field = rng.choice(sorted(CONFIG))
    if kind == "config": c[field] = rng.choice(ODD_VALUES)
    else: c.pop(field)
    cfg.write_text(json.dumps(c)); return f"config {field} = {c.get(field, '<dropped>')!r}"
  if kind == "tokenizer_cut":
    t = tok.read_bytes(); at = rng.randrange(len(t)); tok.write_bytes(t[:at]); return f"tokenizer.json cut at {at}"
  if kind == "tokenizer_value":
    t = json.loads(tok.read_text()); where = rng.choice(["model", "pre_tokenizer", "normalizer", "decoder", "added_tokens"])
    t[where] = rng.choice(ODD_VALUES); tok.write_text(json.dumps(t)); return f"tokenizer {where} = {t[where]!r}"
  victim = rng.choice([st, cfg, tok])
  if kind == "missing": victim.unlink(); return f"{victim.name} missing"
  if kind == "empty": victim.write_bytes(b""); return f"{victim.name} empty"
  victim.unlink(); victim.mkdir(); return f"{victim.name} is a folder"


def data_size() -> int:
  """This process's data segment (heap and private mappings), in bytes: what RLIMIT_DATA limits."""
  for line in Path("/proc/self/status").read_text().splitlines():
    if line.startswith("VmData:"): return int(line.split()[1]) * 1024
  raise OSError("no VmData in /proc/self/status")


@contextlib.contextmanager
def at_most(limit: int, what: str):
  """Run the block with at most `limit` more bytes of data segment than the process holds now (a larger allocation
  raises MemoryError, which the callers count as a failure), at the cost of one system call."""
  soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
  resource.setrlimit(resource.RLIMIT_DATA, (min(data_size() + limit, hard) if hard != resource.RLIM_INFINITY
                                            else data_size() + limit, hard))
  try: yield
  except MemoryError: pytest.fail(f"{what}: more than {limit / 2 ** 20:.0f} MiB")
  finally: resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


def check(load, folder: Path, what: str) -> str:
  try:
    with at_most(PEAK, what): model, _ = load(str(folder))
  except olmoe.OlmoeError as e:
    assert "\n" not in str(e), f"{what}: a multi-line error"
    return "refused"
  except Exception as e:   # noqa: BLE001 -- the point: nothing but OlmoeError may come out
    pytest.fail(f"{what}: {e.__class__.__name__}: {e}")
  cfg, params = model.cfg, model.parameters()
  assert tuple(params["layers.0.mlp.experts.gate_up_proj"].shape) == (cfg.num_experts, 2 * cfg.intermediate_size, cfg.hidden_size), what
  return "loaded"


def flex_valid(root: Path) -> Path:
  """The valid folder as a 3-expert FlexOlmo checkpoint (FlexOlmo has post-norms where OLMoE has input_layernorm)."""
  valid = valid_folder(root)
  c = json.loads((valid / "config.json").read_text())
  (valid / "config.json").write_text(json.dumps({**c, "model_type": "flex_olmo", "expert_names": ["a", "b", "c"]}))
  raw = read_raw(valid)
  raw["model.layers.0.post_feedforward_layernorm.weight"] = raw.pop("model.layers.0.input_layernorm.weight")
  write_safetensors(valid / "model.safetensors", raw)
  return valid


@pytest.mark.parametrize("which", ["olmoe", "flexolmo"])
def test_a_thousand_malformed_folders_end_in_one_clear_error_or_a_consistent_model(which, tmp_path):
  valid = flex_valid(tmp_path) if which == "flexolmo" else valid_folder(tmp_path)
  load = (lambda f: olmoe.load(f, progress=False)) if which == "olmoe" else \
         (lambda f: flexolmo.load(f, progress=False))
  assert check(load, valid, "the valid folder") == "loaded"
  rng, outcomes = random.Random(1234), []
  for case in range(CASES // 2):
    folder = tmp_path / f"case{case}"
    shutil.copytree(valid, folder)
    change = mutate(folder, rng)
    outcomes.append((change.split(":")[0], check(load, folder, f"case {case}: {change}")))
    shutil.rmtree(folder)
  print(tally(which + " API", outcomes))
  assert sum(o == "refused" for _, o in outcomes) > CASES // 4    # most edits break the folder, each said in one line


def tally(name: str, outcomes: list[tuple[str, object]]) -> str:
  """`name: N cases; kind refused/other ...`: how each kind of edit ended."""
  kinds = sorted({k for k, _ in outcomes})
  per = {k: [o for kk, o in outcomes if kk == k] for k in kinds}
  bad = lambda o: o in ("refused", 2)
  return f"{name}: {len(outcomes)} cases; " + ", ".join(f"{k} {sum(map(bad, v))}/{len(v)}" for k, v in per.items())


def test_an_expert_of_another_shape_is_refused_even_when_its_bytes_fit(tmp_path):
  """Stacking per-expert tensors takes the first expert's shape: a later one of another (self-consistent) shape must
  not be read into the stack."""
  valid = valid_folder(tmp_path)
  raw = read_raw(valid)
  raw["model.layers.0.mlp.experts.2.up_proj.weight"] = to_raw(np.ones((5, 8), np.float32), "F32")    # (I+1, D)
  write_safetensors(valid / "model.safetensors", raw)
  with pytest.raises(olmoe.OlmoeError, match="different shapes"): olmoe.load(str(valid), progress=False)


def test_malformed_folders_through_the_command_line(tmp_path):
  """A sample of the same edits through `python olmoe.py`: exit 0, or exit 2 with one `error:` line; never a
  traceback, never a hang (each run is killed after 120 s), and no process over 2 GiB at its peak."""
  import os, subprocess, sys, threading
  from conftest import ROOT
  valid, rng, codes, peaks = valid_folder(tmp_path), random.Random(99), [], []
  for case in range(16):
    folder = tmp_path / f"cli{case}"
    shutil.copytree(valid, folder)
    what = f"case {case}: " + (mutate(folder, rng) if case else "the valid folder")
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
      p = subprocess.Popen([sys.executable, str(ROOT / "olmoe.py"), "--model", str(folder), "--prompt", "hi",
                            "--max-new-tokens", "2"], stdout=out, stderr=err)
      timer = threading.Timer(120, p.kill); timer.start()
      _, status, usage = os.wait4(p.pid, 0)                 # the child's own peak memory, in KiB
      timer.cancel(); p.returncode = os.waitstatus_to_exitcode(status)
    stderr = (tmp_path / "err").read_text()
    lines = stderr.strip().splitlines()
    assert p.returncode in (0, 2) and "Traceback" not in stderr, f"{what} (exit {p.returncode})\n{stderr[-2000:]}"
    if p.returncode == 2: assert len(lines) == 1 and lines[0].startswith("error:"), f"{what}\n{stderr}"
    codes.append(p.returncode); peaks.append(usage.ru_maxrss)
  print(f"command line: {len(codes)} cases, {codes.count(2)} refused, {codes.count(0)} generated, "
        f"largest process {max(peaks) / 1024:.0f} MiB")
  assert codes[0] == 0 and codes.count(2) >= 8 and max(peaks) < 2 * 2 ** 20, (codes, peaks)


def run_main(main, argv: list[str], what: str) -> tuple[int, str, str]:
  """A command line run in this process: (exit code, stdout, stderr). Anything but a return or argparse's exit is a
  traceback the user would see."""
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      with at_most(PEAK, what): code = main(argv)
    except SystemExit as e: code = e.code
    except Exception as e:   # noqa: BLE001 -- the point: the command must not raise
      pytest.fail(f"{what}: {e.__class__.__name__}: {e}")
  return code, out.getvalue(), err.getvalue()


def one_line_or_success(code: int, err: str, what: str) -> None:
  lines = err.strip().splitlines()
  assert code in (0, 2) and "Traceback" not in err, f"{what} (exit {code})\n{err[-2000:]}"
  if code == 2: assert len(lines) == 1 and lines[0].startswith("error: "), f"{what}\n{err}"


@pytest.mark.parametrize("which,cases", [("olmoe", 350), ("flexolmo", 350), ("merge", 300)])
def test_a_thousand_malformed_folders_through_the_command_lines(which, cases, tmp_path):
  """`olmoe.py --model DIR`, `flexolmo.py --model DIR` and `flexolmo.py merge` (one of its inputs edited) run in this
  process, 1,000 cases in all: exit 2 with one line, or a run that prints the prompt and its continuation; a merge
  that fails leaves no folder (and no partial one) behind, one that succeeds writes a folder that loads."""
  from test_faults import flex_folder
  rng, codes = random.Random({"olmoe": 5, "flexolmo": 6, "merge": 7}[which]), []
  if which == "merge":
    public = flex_folder(tmp_path / "public", 1, np.random.default_rng(0))
    valid = flex_folder(tmp_path / "owner", 2, np.random.default_rng(1), read_raw(public))
  else: valid = flex_valid(tmp_path) if which == "flexolmo" else valid_folder(tmp_path)
  main = olmoe.main if which == "olmoe" else flexolmo.main
  slowest = 0.0
  for case in range(-1, cases):        # case -1: the valid folder
    t0 = time.perf_counter()
    cases_dir = tmp_path / f"case{case}"
    cases_dir.mkdir()
    edited = shutil.copytree(public if which == "merge" and case % 4 == 3 else valid, cases_dir / "in")
    change = mutate(edited, rng) if case >= 0 else "valid: the valid folder"
    what = f"{which} case {case}: {change}"
    if which == "merge":
      pub, owner = (edited, valid) if case % 4 == 3 else (public, edited)
      out = cases_dir / "merged"
      code, _, err = run_main(main, ["merge", "--public", str(pub), "--expert", f"b={owner}", "--out", str(out)], what)
      one_line_or_success(code, err, what)
      assert out.exists() == (code == 0), what
      assert not list(cases_dir.glob(".merged.partial-*")), f"{what}: a partial folder was left"
      if code == 0: flexolmo.load(str(out), progress=False)
    else:
      code, out, err = run_main(main, ["--model", str(edited), "--prompt", "hi", "--max-new-tokens", "2"], what)
      one_line_or_success(code, err, what)
      if code == 0: assert out.startswith("hi") and out.endswith("\n"), f"{what}: {out!r}"
    codes.append((change.split(":")[0], code))
    shutil.rmtree(cases_dir)
    slowest = max(slowest, time.perf_counter() - t0)
  print(tally(which + " command line (refused/cases per kind)", codes) + f"; slowest case {slowest:.1f} s")
  assert codes[0] == ("valid", 0) and sum(c == 2 for _, c in codes) > cases // 2, codes
  assert slowest < 60, f"a case took {slowest:.0f} s"       # the first run compiles the model's kernels
