"""A weightless model directory that Dynamo's mocker accepts (written with the standard library).

A byte-level BPE tokenizer with the 256 byte tokens plus <unk>, <s>, </s> and
no merges, a 2-layer llama config.json and a one-line chat template (~28 KB).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List


def _bytes_to_unicode() -> Dict[int, str]:
    # GPT-2's reversible byte → printable character map used by ByteLevel.
    bs: List[int] = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def write_tiny_model(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    byte_map = _bytes_to_unicode()
    vocab = {byte_map[b]: b for b in range(256)}
    specials = ["<unk>", "<s>", "</s>"]
    added = []
    for i, tok in enumerate(specials):
        vocab[tok] = 256 + i
        added.append({"id": 256 + i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
                      "normalized": False, "special": True})
    level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": level, "post_processor": None, "decoder": level,
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": []},
    }
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "model_max_length": 4096,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:",
    }))
    (directory / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
        "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 4, "num_hidden_layers": 2,
        "vocab_size": 259, "max_position_embeddings": 4096, "bos_token_id": 257, "eos_token_id": 258,
        "torch_dtype": "float16", "rms_norm_eps": 1e-6, "hidden_act": "silu",
    }))
    (directory / "generation_config.json").write_text(json.dumps({"bos_token_id": 257, "eos_token_id": 258}))
    return directory
