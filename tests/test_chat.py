"""Chat: the chat template rendered and encoded as transformers' apply_chat_template does it, the end of a turn, and
`--chat` on the command line (one scripted turn, an interactive session on stdin, a model without a template).

Oracles: transformers' tokenizer (PreTrainedTokenizerFast from the same tokenizer.json and tokenizer_config.json) for
the ids; for the command line, the ids of the same conversation generated greedily through the API."""
import json, subprocess, sys
from pathlib import Path
import pytest
from conftest import ROOT, TEXTS, save_hf_olmoe, train_byte_level_bpe
import olmoe
from olmoe_tokenizer import Tokenizer

SPECIALS = ["<|user|>", "<|assistant|>", "<|system|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>"]

# the families of chat templates that released checkpoints carry, written out here (no hub access in the tests)
TEMPLATES = {
  # Tulu (OLMoE-Instruct, OLMo 2 Instruct): EOS ends an assistant turn; BOS first
  "tulu": "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}{{ '<|system|>\\n' + "
          "message['content'] + '\\n' }}{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + "
          "'\\n' }}{% elif message['role'] == 'assistant' %}{% if not loop.last %}{{ '<|assistant|>\\n'  + "
          "message['content'] + eos_token + '\\n' }}{% else %}{{ '<|assistant|>\\n'  + message['content'] + eos_token }}"
          "{% endif %}{% endif %}{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}{% endfor %}",
  # ChatML (Qwen and others): its own end-of-turn token and a default system message
  "chatml": "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system"
            "\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}{{ '<|im_start|>' + message['role'] + '\\n' + "
            "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>"
            "assistant\\n' }}{% endif %}",
  # Llama 2: the system message folded into the first user turn, roles checked with raise_exception, .strip()
  "llama2": "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
            "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}"
            "{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
            "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
            "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
            "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
            "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif "
            "message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}",
  # Zephyr, written over several lines: only trim_blocks and lstrip_blocks make its output one line per turn
  "zephyr": "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\\n' + message['content'] + "
            "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\\n' + message['content'] + eos_token }}\n"
            "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\\n'  + message['content'] + eos_token }}\n"
            "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}",
}
CONVERSATIONS = [
  [{"role": "user", "content": "What is a mixture of experts?"}],
  [{"role": "system", "content": "Answer in one line."}, {"role": "user", "content": "Why route tokens?"}],
  [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " Hello! How can I help? "},
   {"role": "user", "content": "Name 2 experts.\nThen stop."}],
  [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
   {"role": "user", "content": "c <|im_end|> d"}],
]


def chat_tokenizer(folder: Path, template: str | None, eos: str = "</s>") -> Path:
  """A small byte-level BPE with the templates' special tokens, and a tokenizer_config.json with `template`."""
  from tokenizers import AddedToken
  tok = train_byte_level_bpe(TEXTS, 300)
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
  folder.mkdir(parents=True, exist_ok=True)
  tok.save(str(folder / "tokenizer.json"))
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": eos,
            "unk_token": None, "pad_token": "<|padding|>"}
  if template is not None: config["chat_template"] = template
  (folder / "tokenizer_config.json").write_text(json.dumps(config))
  return folder


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_chat_templates_give_transformers_ids(name, tmp_path):
  from transformers import AutoTokenizer
  folder = chat_tokenizer(tmp_path, TEMPLATES[name])
  ours, theirs = Tokenizer.from_file(folder / "tokenizer.json"), AutoTokenizer.from_pretrained(str(folder))
  for messages in CONVERSATIONS:
    if name == "llama2" and messages[-1]["role"] != "user": continue
    for gen in (True, False):
      want = theirs.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
      assert ours.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False) == want
      ids = theirs.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True, return_dict=False)
      assert ours.apply_chat_template(messages, add_generation_prompt=gen) == list(ids), (name, messages)


def test_the_end_of_a_turn_is_the_token_the_template_writes_after_a_reply(tmp_path):
  ends = {}
  for name in TEMPLATES:
    tok = Tokenizer.from_file(chat_tokenizer(tmp_path / name, TEMPLATES[name]) / "tokenizer.json")
    ends[name] = {tok.decode([i]) for i in tok.end_of_turn_ids()}
  assert ends == {"tulu": {"</s>"}, "chatml": {"<|im_end|>"}, "llama2": {"</s>"}, "zephyr": {"</s>"}}


def test_template_errors_and_missing_templates_are_one_line(tmp_path):
  tok = Tokenizer.from_file(chat_tokenizer(tmp_path / "l", TEMPLATES["llama2"]) / "tokenizer.json")
  with pytest.raises(olmoe.OlmoeError, match="roles must alternate"):
    tok.apply_chat_template([{"role": "assistant", "content": "x"}])
  none = Tokenizer.from_file(chat_tokenizer(tmp_path / "n", None) / "tokenizer.json")
  with pytest.raises(olmoe.OlmoeError, match="no chat template"): none.apply_chat_template(CONVERSATIONS[0])
  with pytest.raises(olmoe.OlmoeError, match="chat template"):
    Tokenizer.from_file(chat_tokenizer(tmp_path / "b", "{% for m in messages %}") / "tokenizer.json").apply_chat_template(CONVERSATIONS[0])
  sandboxed = "{{ messages.__class__.__mro__ }}"                     # a template may not reach Python's internals
  with pytest.raises(olmoe.OlmoeError):
    Tokenizer.from_file(chat_tokenizer(tmp_path / "s", sandboxed) / "tokenizer.json").apply_chat_template(CONVERSATIONS[0])


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
  folder = save_hf_olmoe(tmp_path_factory.mktemp("chat") / "m", seed=4, with_tokenizer=False)
  return chat_tokenizer(folder, TEMPLATES["tulu"])


def transformers_chat(folder: Path, turns: list[str], new: int) -> list[str]:
  """The replies of a greedy conversation run entirely by transformers (its template, tokenizer and generate)."""
  import torch
  from transformers import AutoTokenizer
  from conftest import hf_reference
  tok, model = AutoTokenizer.from_pretrained(str(folder)), hf_reference(folder)
  stop = [0, tok.convert_tokens_to_ids("</s>")]
  messages, replies = [], []
  for text in turns:
    messages.append({"role": "user", "content": text})
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    with torch.no_grad():
      out = model.generate(torch.tensor([ids]), max_new_tokens=new, do_sample=False, eos_token_id=stop, pad_token_id=1)
    reply = [t for t in out[0, len(ids):].tolist() if t not in stop]
    replies.append(tok.decode(reply))
    messages.append({"role": "assistant", "content": replies[-1]})
  return replies


def chat_cli(*args, stdin: str | None = None):
  return subprocess.run([sys.executable, str(ROOT / "olmoe.py"), *map(str, args)], input=stdin, capture_output=True,
                        text=True, cwd=ROOT, timeout=600)


def test_chat_turns_on_the_command_line_and_on_stdin_equal_transformers_conversation(chat_model):
  turns = ["What is a mixture of experts?", "And why route tokens?", "Thanks."]
  want = "".join(r + "\n" for r in transformers_chat(chat_model, turns, 8))
  args = ["--model", chat_model, "--chat", "--max-new-tokens", "8"]
  r = chat_cli(*args, *[a for t in turns for a in ("--prompt", t)])
  assert r.returncode == 0 and r.stdout == want, r.stderr[-3000:]
  r = chat_cli(*args, stdin="".join(t + "\n" for t in turns) + "\n")        # typed turns, then Ctrl-D
  assert r.returncode == 0 and r.stdout == want, r.stderr[-3000:]


def test_chat_needs_a_chat_template_and_says_so_in_one_line(tmp_path):
  folder = save_hf_olmoe(tmp_path / "m", seed=4)                           # tokenizer.json only
  for args in (["--chat", "--prompt", "hi"], ["--system", "be brief", "--prompt", "hi"], []):
    r = chat_cli("--model", folder, *args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
  assert "no chat template" in chat_cli("--model", folder, "--chat", "--prompt", "hi").stderr


def test_ctrl_c_during_a_chat_reply_keeps_the_text_and_exits_130(tmp_path):
  """SIGINT while a reply streams: the reply so far stays on stdout, exit 130, no traceback. (A template with no
  end-of-turn token and a model without EOS, so that the reply is still streaming when the signal comes.)"""
  import signal, time
  folder = save_hf_olmoe(tmp_path / "m", seed=2, max_position_embeddings=8192, eos_token_id=None, with_tokenizer=False)
  chat_tokenizer(folder, "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
  p = subprocess.Popen([sys.executable, str(ROOT / "olmoe.py"), "--model", str(folder), "--chat", "--max-new-tokens",
                        "8000"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       cwd=ROOT, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  p.stdin.write("hello\n"); p.stdin.flush()                          # a turn, and stdin left open
  seen = p.stdout.read(3)                                              # the reply has begun
  time.sleep(0.5)
  p.send_signal(signal.SIGINT)
  out, err = p.communicate(timeout=120)
  assert p.returncode == 130 and "Traceback" not in err, err[-3000:]
  assert len(seen + out) > 3 and err.strip().splitlines()[-1] == "[stopped]"
