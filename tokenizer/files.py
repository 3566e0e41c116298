"""Which files of a folder are a tokenizer's.

A Hugging Face model folder holds its weights and its tokenizer together, so a
tokenizer folder is often a model folder too. Only these files travel when dapt
copies a tokenizer (into the checkpoints, into an export): copying the whole folder
would carry the base model's weights and config along and put them over the trained ones.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

# Settings that do not describe the vocabulary: an extended tokenizer keeps them from its base.
TOKENIZER_SETTINGS = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json",
                      "additional_chat_templates")
# The vocabulary in the forms transformers' tokenizer classes save it.
VOCABULARY_FILES = ("tokenizer.json", "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model",
                    "sentencepiece.model", "spiece.model", "sentencepiece.bpe.model")
TOKENIZER_FILES = VOCABULARY_FILES + TOKENIZER_SETTINGS


def make_portable(folder: Path) -> None:
    """The folder's tokenizer_config.json as transformers 4.x reads it too. transformers 5 writes
    `extra_special_tokens` as a list where 4.x expects a mapping (4.x's list is
    `additional_special_tokens`, which 5 still reads), and may name its own `TokenizersBackend`
    class, which 4.x lacks; `PreTrainedTokenizerFast` is the same class under the name both know.
    A causal LM's inputs are named, as 5 assumes and 4.x does not."""
    path = Path(folder) / "tokenizer_config.json"
    if not path.exists():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    before = dict(config)
    extra = config.get("extra_special_tokens")
    if isinstance(extra, list):
        del config["extra_special_tokens"]
        if extra:
            config.setdefault("additional_special_tokens", extra)
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    # 4.x's fast tokenizer returns token_type_ids unless told its inputs, and a causal LM's
    # `generate(**tokenizer(prompt))` refuses them.
    config.setdefault("model_input_names", ["input_ids", "attention_mask"])
    if config != before:
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def copy_tokenizer_files(source: Path, destination: Path, names: tuple[str, ...] = TOKENIZER_FILES) -> list[str]:
    """Copy the tokenizer files among `names` that `source` has into `destination` (its config made
    loadable by transformers 4.x and 5.x); returns their names."""
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
    make_portable(destination)
    return copied
