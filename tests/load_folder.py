"""Load a folder dapt wrote with this interpreter's transformers and print what it makes of it, as JSON.

Run by tests/test_exports_load.py under the project's transformers and under another
version (`DAPT_OTHER_TRANSFORMERS_PYTHON`), which must print the same. It imports no dapt.
"""

import json
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

# Text that tokenizers get wrong: CJK, emoji (a ZWJ sequence), combining marks, CRLF, tabs, runs of spaces.
HOSTILE = ["Total revenue was $1,234.5 million.", "日本の銀行は金利を据え置いた。", "Profit 📈👩‍💻 up 12%!",
           "Cafe\u0301 na\u0308ive re\u0301sume\u0301", "line one\r\nline two\ttabbed   spaced  ", "  leading and\n\n\nnewlines "]


def main(folder: str, with_model: bool) -> None:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in HOSTILE]
    report = {"transformers": transformers.__version__, "ids": ids,
              "decoded": [tokenizer.decode(i) for i in ids]}
    if with_model:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        prompt = tokenizer("Total revenue was", return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        report["generated"] = out[0].tolist()
        generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
        report["pipeline"] = generator("Total revenue was", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] == "model")
