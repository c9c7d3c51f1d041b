"""Rows and chat tokenizers for the calibration tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

ROW = {"task": "reverse", "prompt": "reverse a b c", "completion": "= c b a"}
USER = {"role": "user", "content": "reverse a b c"}
ANSWER = {"role": "assistant", "content": "= c b a"}

# Role markers and an end-of-turn token, the answers marked as HF's generation blocks:
# transformers' own assistant mask is then the reference for the counted tokens.
MARKED_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|> "
    "{% generation %}{{ m['content'] }} </s>{% endgeneration %}\n"
    "{% else %}<|{{ m['role'] }}|> {{ m['content'] }} </s>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
# Renders [user, assistant] as prompt + " " + completion: the chat row and the
# prompt/completion row are then the same tokens.
PLAIN_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %} {% endif %}{{ m['content'] }}"
    "{% endfor %}{% if add_generation_prompt %} {% endif %}"
)


def write_rows(path: Path, rows: list[dict | bytes]) -> Path:
    path.write_bytes(b"".join(row if isinstance(row, bytes) else json.dumps(row).encode() + b"\n" for row in rows))
    return path


def as_chat(row: dict) -> dict:
    return {"task": row["task"], "messages": [{"role": "user", "content": row["prompt"]},
                                              {"role": "assistant", "content": row["completion"]}]}


def with_template(base: Path, folder: Path, template: str) -> Path:
    """A copy of a model folder whose tokenizer carries ``template``."""
    from transformers import AutoTokenizer

    shutil.copytree(base, folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.chat_template = template
    tokenizer.save_pretrained(str(folder))
    return folder
