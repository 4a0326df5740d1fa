"""A tiny random LlamaForCausalLM with a locally trained byte-level BPE tokenizer
and a ChatML chat template, for tests against real vLLM on CPU. Nothing comes
from a model hub.

    python make_tiny_hf_model.py OUT_DIR

OUT_DIR/lora-sql is a LoRA adapter for it (rank 8 on q_proj and v_proj, random
weights large enough to change its greedy answers), in the PEFT layout vLLM
loads with `--lora-modules sql=OUT_DIR/lora-sql`.
"""
import json
import os
import sys

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>", "<unk>"]

# Training text: a small fixed vocabulary, some JSON and punctuation.
words = (
    "the quick brown fox jumps over the lazy dog hello world vllm rust server "
    "test completion chat model token stream json schema answer question user "
    "assistant system you are a helpful say hi once again one two three four "
    "five six seven eight nine ten zero and or not is are was were be been"
).split()
lines = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(12)) + "." for i in range(400)]
lines += ['{"name": "x", "value": 1, "ok": true, "list": [1, 2, 3]}'] * 20
lines += ["Hello, World! 0123456789 ?!.,;:'\"()[]{}<>/\\|@#$%^&*-_=+~`"] * 20

# A byte-level BPE whose alphabet is printable ASCII, space, newline and tab,
# so whatever token the random model samples decodes to clean text.
byte_to_char, shifted = {}, 0
for b in range(256):  # the byte-to-character map of the ByteLevel pre-tokenizer
    if 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF:
        byte_to_char[b] = chr(b)
    else:
        byte_to_char[b] = chr(256 + shifted)
        shifted += 1
alphabet = [byte_to_char[b] for b in list(range(0x20, 0x7F)) + [0x0A, 0x09]]
tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tokenizer.decoder = decoders.ByteLevel()
tokenizer.train_from_iterator(
    lines,
    trainer=trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=SPECIALS,
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
        show_progress=False,
    ),
)

# A reasoning model's markers, as plain added tokens (kept in the text), so
# that vLLM's reasoning parsers (`--reasoning-parser deepseek_r1`) find them.
tokenizer.add_tokens(["<think>", "</think>"])

hf_tokenizer = PreTrainedTokenizerFast(
    tokenizer_object=tokenizer,
    bos_token="<|endoftext|>",
    eos_token="<|im_end|>",
    pad_token="<|pad|>",
    unk_token="<unk>",
    model_max_length=2048,
)
hf_tokenizer.chat_template = CHAT_TEMPLATE
hf_tokenizer.save_pretrained(out)
# Newer transformers write the template to chat_template.jinja; older vLLM
# code paths read it from tokenizer_config.json: keep it in both.
config_path = os.path.join(out, "tokenizer_config.json")
with open(config_path) as f:
    tokenizer_config = json.load(f)
tokenizer_config["chat_template"] = CHAT_TEMPLATE
with open(config_path, "w") as f:
    json.dump(tokenizer_config, f, indent=2)

config = LlamaConfig(
    vocab_size=len(hf_tokenizer),  # every sampled id decodes
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,  # head size 32: the smallest vLLM's CPU attention takes
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    bos_token_id=hf_tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    eos_token_id=hf_tokenizer.convert_tokens_to_ids("<|im_end|>"),
    pad_token_id=hf_tokenizer.convert_tokens_to_ids("<|pad|>"),
    tie_word_embeddings=False,
)
torch.manual_seed(0)
model = LlamaForCausalLM(config).to(torch.bfloat16)  # what vLLM on CPU picks for "auto"
model.save_pretrained(out, safe_serialization=True)
print(f"vocab={len(hf_tokenizer)} params={sum(p.numel() for p in model.parameters())}", file=sys.stderr)

# A LoRA adapter in PEFT's layout, written by hand (no peft here).
from safetensors.torch import save_file

lora_dir = os.path.join(out, "lora-sql")
os.makedirs(lora_dir, exist_ok=True)
rank = 8
torch.manual_seed(1)
lora = {}
for i in range(config.num_hidden_layers):
    for proj in ["q_proj", "v_proj"]:
        base = f"base_model.model.model.layers.{i}.self_attn.{proj}"
        lora[f"{base}.lora_A.weight"] = torch.randn(rank, config.hidden_size).to(torch.bfloat16)
        lora[f"{base}.lora_B.weight"] = torch.randn(config.hidden_size, rank).to(torch.bfloat16)
save_file(lora, os.path.join(lora_dir, "adapter_model.safetensors"))
with open(os.path.join(lora_dir, "adapter_config.json"), "w") as f:
    json.dump(
        {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": rank,
            "lora_alpha": 16,
            "lora_dropout": 0.0,
            "target_modules": ["q_proj", "v_proj"],
            "bias": "none",
            "fan_in_fan_out": False,
            "modules_to_save": None,
            "base_model_name_or_path": "tiny-llama",
        },
        f,
        indent=2,
    )
