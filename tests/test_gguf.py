"""GGUF files (olmoe_gguf.py, `olmoe.load("x.gguf")`, `--model x.gguf`).

Oracles: llama.cpp's own Python package `gguf` (its writer makes the files; its GGUFReader and its reference
dequantisation read them back, independently of olmoe_gguf.py), transformers' OlmoeForCausalLM given the weights
that reader dequantises, and the tokenizer.json the file's vocabulary came from."""
import json, subprocess, sys
import numpy as np
import pytest
from conftest import ROOT, save_hf_olmoe, hf_reference
import olmoe, olmoe_gguf
from olmoe import OlmoeError

gguf = pytest.importorskip("gguf", reason="the gguf package (llama.cpp's writer) makes the test files: pip install gguf")
sys.path.insert(0, str(ROOT / "bench"))
from make_gguf import convert                          # noqa: E402

KINDS = ["Q8_0", "Q4_0", "Q4_K", "Q6_K"]
CHAT = "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  # rows of 256 so that every type applies (K-quants come in super-blocks of 256)
  return save_hf_olmoe(tmp_path_factory.mktemp("gguf") / "m", hidden_size=256, intermediate_size=256, num_attention_heads=4,
                       num_experts=8, num_experts_per_tok=2)

@pytest.fixture(scope="module")
def files(ckpt, tmp_path_factory):
  out = tmp_path_factory.mktemp("gguf-files")
  got = {}
  for k in KINDS:
    (out / k).mkdir()
    convert(ckpt, out / k / "m.gguf", k, chat_template=CHAT)
    got[k] = out / k / "m.gguf"
  return got


def reference_weights(path) -> dict[str, np.ndarray]:
  """Every tensor of the file as llama.cpp's reader and reference dequantisation give it (numpy order)."""
  r = gguf.GGUFReader(str(path))
  return {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(int(d) for d in t.shape[::-1]))
          for t in r.tensors}

def hf_with(ckpt, ref: dict[str, np.ndarray]):
  """transformers' model of the checkpoint with every weight replaced by the file's dequantised one."""
  import torch
  m = hf_reference(ckpt)
  names = {v: k for k, v in olmoe_gguf.NAMES.items()}
  with torch.no_grad():
    for key, p in m.state_dict().items():
      parts = key.removeprefix("model.").removesuffix(".weight").split(".")
      if parts[0] == "layers":
        rest = ".".join(parts[2:])
        if rest.startswith("mlp.experts."):
          E_gate = ref[f"blk.{parts[1]}.ffn_gate_exps.weight"]
          up, down = ref[f"blk.{parts[1]}.ffn_up_exps.weight"], ref[f"blk.{parts[1]}.ffn_down_exps.weight"]
          w = np.concatenate([E_gate, up], 1) if "gate_up" in rest else down
          if p.shape != w.shape: w = w.transpose(0, 2, 1)
        else: w = ref[f"blk.{parts[1]}.{names[rest]}.weight"]
      else: w = ref[f"{names[parts[0]] if parts[0] != 'lm_head' else 'output'}.weight"]
      p.copy_(torch.from_numpy(np.array(w)).reshape(p.shape))
  return m


@pytest.mark.parametrize("kind", KINDS)
def test_weights_equal_llama_cpp_dequantisation(files, kind):
  """Each weight the model holds (codes and scales repacked, dequantised by the kernel) equals the gguf package's
  reference dequantisation of the same file, bit for bit."""
  model, _ = olmoe.load(str(files[kind]), progress=False)
  ref = reference_weights(files[kind])
  ours = model.parameters()
  for gname, a in ref.items():
    parts = gname.removesuffix(".weight").split(".")
    if parts[-1] in ("ffn_gate_exps", "ffn_up_exps"):
      w = ours[f"layers.{parts[1]}.mlp.experts.gate_up_proj"].numpy()
      w = np.split(w, 2, axis=1)[parts[-1] == "ffn_up_exps"]
    else: w = ours[olmoe_gguf.our_name(gname)].numpy()
    assert np.array_equal(w, a), gname

@pytest.mark.parametrize("kind", KINDS)
def test_logits_equal_transformers_on_the_dequantised_weights(ckpt, files, kind):
  """The quantised model's logits equal transformers' on the weights llama.cpp's reader dequantises (fp32), and
  stay near the unquantised model's."""
  import torch
  model, _ = olmoe.load(str(files[kind]), progress=False)
  ids = np.random.default_rng(1).integers(2, 320, (2, 12))
  ours = model(olmoe.Tensor(ids.tolist())).numpy()
  with torch.no_grad():
    theirs = hf_with(ckpt, reference_weights(files[kind]))(torch.tensor(ids)).logits.numpy()
    exact = hf_reference(ckpt)(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(ours, theirs, atol=2e-4, rtol=2e-4)
  assert np.abs(ours - exact).mean() < {"Q8_0": 0.02, "Q6_K": 0.15, "Q4_0": 0.3, "Q4_K": 0.3}[kind] * np.abs(exact).mean()

def test_held_bytes_are_the_quantised_ones(files):
  """Q4_0 holds half a byte per weight plus an fp16 scale per 32: the model's buffers add up to the file's tensor
  bytes (no fp32 copy of any large weight)."""
  from olmoe_int8 import held_bytes
  model, _ = olmoe.load(str(files["Q4_0"]), progress=False)
  held = sum(held_bytes(model).values())
  r = gguf.GGUFReader(str(files["Q4_0"]))
  assert held == sum(int(t.n_bytes) for t in r.tensors)

def test_config_and_tokenizer_from_the_file(ckpt, files, tmp_path):
  """Without tokenizer.json beside it, the file's vocabulary and merges give tokenizer.json's ids; the chat template
  comes from the file; the config equals the checkpoint's."""
  from olmoe_tokenizer import Tokenizer
  from conftest import TEXTS
  lone = tmp_path / "lone.gguf"
  lone.write_bytes(files["Q8_0"].read_bytes())
  model, tok = olmoe.load(str(lone), progress=False)
  ref = Tokenizer.from_file(ckpt / "tokenizer.json")
  for text in TEXTS[:6]: assert tok.encode(text) == ref.encode(text) and tok.decode(ref.encode(text)) == ref.decode(ref.encode(text))
  assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<|user|>\nhi\n<|assistant|>\n"
  cfg = json.loads((ckpt / "config.json").read_text())
  for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_experts", "num_experts_per_tok", "vocab_size"):
    assert getattr(model.cfg, k) == cfg[k], k


def test_cli_runs_a_gguf_file_as_greedy_transformers(ckpt, files):
  """`olmoe.py --model x.gguf` (a file, and a folder holding it) prints transformers' greedy continuation on the
  dequantised weights."""
  import torch
  from olmoe_tokenizer import Tokenizer
  tok = Tokenizer.from_file(ckpt / "tokenizer.json")
  prompt = "The quick brown"
  with torch.no_grad():
    out = hf_with(ckpt, reference_weights(files["Q8_0"])).generate(torch.tensor([tok.encode(prompt)]), max_new_tokens=8, do_sample=False)
  want = tok.decode(out[0, len(tok.encode(prompt)):].tolist())
  for where in (files["Q8_0"], files["Q8_0"].parent):
    r = subprocess.run([sys.executable, str(ROOT / "olmoe.py"), "--model", str(where), "--prompt", prompt,
                        "--max-new-tokens", "8", "--temperature", "0"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n").endswith(want) and prompt in r.stdout


def _edit(src, dst, at: int, data: bytes):
  b = bytearray(src.read_bytes()); b[at:at + len(data)] = data; dst.write_bytes(bytes(b))

def test_bad_files_are_one_line(files, tmp_path):
  """Truncated, foreign, wrongly typed or oversized-header files: an OlmoeError naming the file, before any large
  allocation; the CLI exits 2 with one line."""
  src = files["Q4_0"]
  r = gguf.GGUFReader(str(src))
  t0 = r.tensors[0]
  cases = {}
  cases["cut.gguf"] = src.read_bytes()[: src.stat().st_size // 2]
  cases["header.gguf"] = src.read_bytes()[:200]
  cases["magic.gguf"] = b"GGUX" + src.read_bytes()[4:]
  b = bytearray(src.read_bytes()); b[8:16] = (2**62).to_bytes(8, "little"); cases["count.gguf"] = bytes(b)   # n_tensors
  b = bytearray(src.read_bytes()); b[24:32] = (2**60).to_bytes(8, "little"); cases["strlen.gguf"] = bytes(b)   # first key length
  b = bytearray(src.read_bytes())
  type_at = int(t0.field.offset) + int(sum(p.nbytes for p in t0.field.parts[:-2]))           # the tensor's ggml type
  b[type_at:type_at + 4] = (13).to_bytes(4, "little"); cases["q5k.gguf"] = bytes(b)
  arch = src.read_bytes().replace(b"olmoe", b"llama", 1)
  cases["arch.gguf"] = arch
  for name, data in cases.items():
    p = tmp_path / name; p.write_bytes(data)
    with pytest.raises(OlmoeError, match=name.replace(".", r"\.")): olmoe.load(str(p), progress=False)
  msg = {"q5k.gguf": "Q5_K", "arch.gguf": "architecture", "magic.gguf": "not a GGUF", "cut.gguf": "outside the file"}
  for name, m in msg.items():
    with pytest.raises(OlmoeError, match=m): olmoe.load(str(tmp_path / name), progress=False)
  r = subprocess.run([sys.executable, str(ROOT / "olmoe.py"), "--model", str(tmp_path / "q5k.gguf"), "--prompt", "x"],
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
  r = subprocess.run([sys.executable, str(ROOT / "olmoe.py"), "--model", str(src), "--prompt", "x", "--quantize", "int8"],
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 2 and "already quantised" in r.stderr
