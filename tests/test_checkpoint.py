"""olmoe_checkpoint: safetensors files written and read, and malformed ones refused with one line.

Oracles: the `safetensors` library (it reads what we write, and it too refuses each malformed file), numpy, and the
command line's exit code and stderr."""
import json, re, struct, subprocess, sys
import numpy as np
import pytest
from safetensors import safe_open
from conftest import ROOT
import olmoe
from olmoe import OlmoeError
from olmoe_checkpoint import Raw, bf16_bits, raw_to_numpy, read_raw, read_safetensors_header, to_raw, write_safetensors


def tensors():
  rng = np.random.default_rng(0)
  return {"a": rng.standard_normal((3, 4), dtype=np.float32), "b": rng.standard_normal((5,), dtype=np.float32),
          "c": rng.standard_normal((2, 2, 2), dtype=np.float32)}

def test_written_files_read_back_in_safetensors_and_here(tmp_path):
  """F32 exactly, BF16 as torch rounds it (nearest even, checked on hand-picked halfway cases), F16 as numpy."""
  import torch
  ts = tensors()
  for dt in ("F32", "BF16", "F16"):
    (tmp_path / dt).mkdir()
    path = tmp_path / dt / "model.safetensors"
    write_safetensors(path, {k: to_raw(a, dt) for k, a in ts.items()}, {"format": "pt"})
    ours = read_raw(tmp_path / dt)
    with safe_open(str(path), "pt") as f:                                    # torch reads the same bytes
      for k, a in ts.items():
        want = {"F32": lambda: a, "F16": lambda: a.astype(np.float16).astype(np.float32),
                "BF16": lambda: torch.tensor(a).bfloat16().float().numpy()}[dt]()
        assert np.array_equal(f.get_tensor(k).float().numpy(), want), (dt, k)
        assert np.array_equal(raw_to_numpy(ours[k]), want), (dt, k)
  # round to nearest even at the halfway points: 1 + 2^-8 lies halfway between bf16 1 and 1 + 2^-7
  halfway = np.array([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8)], dtype=np.float32)
  assert bf16_bits(halfway).tolist() == [0x3F80, 0x3F82, 0xBF80]
  assert not list(tmp_path.rglob("*.partial"))                               # nothing left under a temporary name

def test_read_raw_gives_the_stored_bytes(tmp_path):
  write_safetensors(tmp_path / "model.safetensors", {k: to_raw(a, "F32") for k, a in tensors().items()})
  raw = read_raw(tmp_path)
  assert set(raw) == {"a", "b", "c"} and raw["a"] == Raw("F32", [3, 4], tensors()["a"].tobytes())


def rewrite(path, edit=None, head_bytes=None, cut=None):
  """A copy of a valid file with its header edited (the data section kept), its first 8 bytes replaced, or cut."""
  blob = path.read_bytes()
  (n,) = struct.unpack("<Q", blob[:8])
  header, data = json.loads(blob[8:8 + n]), blob[8 + n:]
  if edit: edit(header)
  head = json.dumps(header).encode()
  out = struct.pack("<Q", len(head)) + head + data
  if head_bytes is not None: out = head_bytes + out[8:]
  if cut is not None: out = out[:cut]
  bad = path.parent / "bad.safetensors"
  bad.write_bytes(out)
  return bad

def set_entry(key, field, value): return lambda h: h[key].__setitem__(field, value)

MALFORMED = {   # name -> how the valid file is broken, and a word the error must contain
  "random first bytes": (dict(head_bytes=bytes([0xF3, 0x91, 0x07, 0xAA, 0x5C, 0xE2, 0x19, 0x7D])), "header"),
  "header length past the end": (dict(head_bytes=struct.pack("<Q", 10 ** 6)), "header"),
  "empty file": (dict(cut=0), "not a safetensors"),
  "header not JSON": (None, "not a readable"),                                       # built in the test
  "shortened byte range": (dict(edit=lambda h: h["b"].__setitem__("data_offsets", [h["b"]["data_offsets"][0], h["b"]["data_offsets"][1] - 4])), "bytes for shape"),
  "shape that does not fit its bytes": (dict(edit=set_entry("a", "shape", [4, 4])), "bytes for shape"),
  "negative shape": (dict(edit=set_entry("a", "shape", [-3, -4])), "bad shape"),
  "shape of the wrong type": (dict(edit=set_entry("a", "shape", "3x4")), "bad shape"),
  "unknown dtype": (dict(edit=set_entry("b", "dtype", "F99")), "unknown dtype"),
  "overlapping tensors": (dict(edit=lambda h: h["c"].__setitem__("data_offsets", [h["a"]["data_offsets"][0], h["a"]["data_offsets"][0] + 32])), "share bytes"),
  "truncated data": (dict(cut=-8), "truncated"),
  "header a list": (None, "JSON object"),                                             # built in the test
}

@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_headers_are_refused_by_us_and_by_safetensors(case, tmp_path):
  good = tmp_path / "good.safetensors"
  write_safetensors(good, {k: to_raw(a, "F32") for k, a in tensors().items()})
  how, word = MALFORMED[case]
  if case == "header not JSON":
    blob = good.read_bytes(); (n,) = struct.unpack("<Q", blob[:8])
    (bad := tmp_path / "bad.safetensors").write_bytes(blob[:8] + b"{" + b"x" * (n - 1) + blob[8 + n:])
  elif case == "header a list":
    head = b"[1, 2, 3]    "
    (bad := tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", len(head)) + head)
  else:
    kw = dict(how)
    if kw.get("cut", 0) < 0: kw["cut"] = good.stat().st_size + kw["cut"]
    bad = rewrite(good, **kw)
  with pytest.raises(OlmoeError) as e: read_safetensors_header(bad)
  assert str(bad) in str(e.value) and word in str(e.value) and "\n" not in str(e.value)
  with pytest.raises(Exception):                                            # the reference reader refuses it too
    with safe_open(str(bad), "np") as f: [f.get_tensor(k) for k in f.keys()]


def test_cli_names_the_file_of_a_checkpoint_with_random_first_bytes(tmp_path):
  """The first 8 bytes of a download that is not a safetensors file: one line, exit 2, before any large read."""
  import shutil
  model = tmp_path / "model"
  shutil.copytree(ROOT / "models" / "olmoe-demo", model)
  blob = bytearray((model / "model.safetensors").read_bytes())
  blob[:8] = bytes([0xF3, 0x91, 0x07, 0xAA, 0x5C, 0xE2, 0x19, 0x7D])
  (model / "model.safetensors").write_bytes(bytes(blob))
  r = subprocess.run([sys.executable, str(ROOT / "olmoe.py"), "--model", str(model), "--prompt", "hi"],
                     capture_output=True, text=True, timeout=300)
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and "model.safetensors" in lines[0], r.stderr


def test_progress_counts_the_bytes_read(capsys):
  """Loading with progress shows a bar in bytes whose total is the checkpoint's tensor bytes (as the safetensors
  library reads them) and that ends full; with --quantize int8 it says it quantises."""
  from safetensors.torch import load_file
  demo = ROOT / "models" / "olmoe-demo"
  total = sum(a.numel() * a.element_size() for a in load_file(demo / "model.safetensors").values())
  for quantize, label in ((None, "loading:"), ("int8", "loading and quantising:")):
    olmoe.load(str(demo), progress=True, quantize=quantize)
    last = capsys.readouterr().err.strip().split("\r")[-1]
    assert last.startswith(label) and "100%" in last, last
    done, whole = re.search(r"\| ([\d.]+[kMG]?)/([\d.]+[kMG]?) ", last).groups()
    value = lambda s: float(s.rstrip("kMG")) * {"k": 1e3, "M": 1e6, "G": 1e9}.get(s[-1], 1)
    assert done == whole and abs(value(whole) - total) <= 0.01 * total, (whole, total)
