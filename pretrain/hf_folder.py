"""Model folders as transformers 4.x reads them too.

transformers 5 writes the rotary embedding's settings as `rope_parameters`; 4.x (4.57,
still pinned by many serving and evaluation stacks) reads `rope_theta` and
`rope_scaling` and, not finding them, silently builds the model with its default base
of 10,000: SmolLM2 (100,000) then loads without an error and predicts other tokens. Each
config dapt writes carries both forms, which 5 reads alike.
"""

from __future__ import annotations

import json
from pathlib import Path


def make_config_portable(folder: Path) -> None:
    """The folder's config.json with the rotary settings in 4.x's form beside 5's."""
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" not in rope or "rope_theta" in config:
        return  # nothing to add (a per-layer-type form, or both forms already)
    config["rope_theta"] = rope["rope_theta"]
    if rope.get("rope_type", "default") != "default":
        config.setdefault("rope_scaling", {key: value for key, value in rope.items() if key != "rope_theta"})
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def save_model_folder(model, out_dir: Path, max_shard_size: str = "5GB") -> None:
    """`save_pretrained` in safetensors, its config readable by transformers 4.x and 5.x alike."""
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size=max_shard_size)
    make_config_portable(out_dir)
