"""lm-eval aggregations for dapt's tasks.

Copied as `utils.py` into every task folder `dapt eval --tasks` writes, so the folder scores
with lm-eval alone (`lm_eval --include_path <folder>`), in any environment: it imports no dapt.
"""


def macro_f1(items):
    """F1 averaged over labels (lm-eval's built-in `f1` is binary); `items` are (gold, prediction) pairs."""
    from sklearn.metrics import f1_score

    golds, predictions = zip(*items)
    return float(f1_score(golds, predictions, average="macro", zero_division=0))
