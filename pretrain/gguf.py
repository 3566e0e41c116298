"""`dapt model import-gguf FILE OUT`: a GGUF file (llama.cpp's format) → a Hugging Face model folder.

transformers reads GGUF through the `gguf` package and dequantizes the weights; the model it
returns carries a `quantization_config` that makes `save_pretrained` refuse it, although its
weights are plain tensors by then. Dropped, the model saves as an ordinary folder (weights,
config, generation config) and its tokenizer beside it, which `model.path` then takes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dapt.base import DaptError
from dapt.pretrain.hf_folder import save_model_folder
from dapt.tokenizer.files import make_portable


def import_gguf(gguf_file: Path, out_dir: Path) -> Path:
    """Write the model and tokenizer of `gguf_file` (dequantized to fp32) to `out_dir`."""
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file)
    if not gguf_file.is_file() or gguf_file.suffix != ".gguf":
        raise DaptError(f"{gguf_file} is not a .gguf file")
    if importlib.util.find_spec("gguf") is None:
        raise DaptError("reading GGUF files needs the `gguf` package: pip install gguf (or dapt[gguf])")
    folder, name = gguf_file.parent, gguf_file.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    del model.config.quantization_config
    model.hf_quantizer = None
    out_dir.mkdir(parents=True, exist_ok=True)
    save_model_folder(model, out_dir)
    tokenizer.save_pretrained(out_dir)
    make_portable(out_dir)
    return out_dir
