"""Which files of a folder are a tokenizer's.

A Hugging Face model folder holds its weights and its tokenizer together, so a
tokenizer folder is often a model folder too. Only these files travel when dapt
copies a tokenizer (into the checkpoints, into an export): copying the whole folder
would carry the base model's weights and config along and put them over the trained ones.
"""

from __future__ import annotations

import shutil
from pathlib import Path

# Settings that do not describe the vocabulary: an extended tokenizer keeps them from its base.
TOKENIZER_SETTINGS = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json",
                      "additional_chat_templates")
# The vocabulary in the forms transformers' tokenizer classes save it.
VOCABULARY_FILES = ("tokenizer.json", "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model",
                    "sentencepiece.model", "spiece.model", "sentencepiece.bpe.model")
TOKENIZER_FILES = VOCABULARY_FILES + TOKENIZER_SETTINGS


def copy_tokenizer_files(source: Path, destination: Path, names: tuple[str, ...] = TOKENIZER_FILES) -> list[str]:
    """Copy the tokenizer files among `names` that `source` has into `destination`; returns their names."""
    destination.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in names:
        item = Path(source) / name
        if item.is_dir():
            shutil.copytree(item, destination / name, dirs_exist_ok=True)
        elif item.is_file():
            shutil.copy2(item, destination / name)
        else:
            continue
        copied.append(name)
    return copied
