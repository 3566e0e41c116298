"""Load folders dapt wrote with this interpreter's transformers and say what it makes of each, as JSON.

Started once per test session under the project's transformers and once under another version
(`DAPT_OTHER_TRANSFORMERS_PYTHON`, see `tests/conftest.py`), which must say the same: a request is
one line on stdin (`{"folder": ..., "model": true}`), the answer one JSON line on the answer pipe.
Every folder is read from disk afresh; only the imports (seconds) are paid once. It imports no dapt.
"""

import json
import os
import sys
import traceback

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

# Text that tokenizers get wrong: CJK, emoji (a ZWJ sequence), combining marks, CRLF, tabs, runs of spaces.
HOSTILE = ["Total revenue was $1,234.5 million.", "日本の銀行は金利を据え置いた。", "Profit 📈👩‍💻 up 12%!",
           "Cafe\u0301 na\u0308ive re\u0301sume\u0301", "line one\r\nline two\ttabbed   spaced  ", "  leading and\n\n\nnewlines "]


def load(folder: str, with_model: bool) -> dict:
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
    return report


def serve() -> None:
    # Answers go to the process's real stdout alone; what the libraries print goes to stderr.
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout = sys.stderr
    for line in sys.stdin:
        request = json.loads(line)
        try:
            answer = load(request["folder"], request["model"])
        except Exception:  # the test names the folder and shows this
            answer = {"error": traceback.format_exc()}
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


if __name__ == "__main__":
    serve()
