"""Config files as users write them: YAML read with its line numbers kept, and a
validation error turned into one line that names the file, the line, the field's
dotted path and what is allowed (with a did-you-mean for a mistyped key).

Every config file dapt reads (experiments, evaluation tasks) and every config built
from the command line goes through `config_error`, so their errors read alike.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from dapt.base import DaptError


def read_yaml(path: Path, kind: str) -> tuple[Any, yaml.Node | None, str]:
    """The file's data, its node tree (for line numbers) and its text; `kind` names the file in errors."""
    if not path.is_file():
        raise DaptError(f"{kind} file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        return yaml.safe_load(text), yaml.compose(text, Loader=yaml.SafeLoader), text
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise DaptError(f"{where}: YAML syntax error: {getattr(err, 'problem', None) or err}") from None


def config_error(err: ValidationError, model: type[BaseModel], path: Path | None = None,
                 root: yaml.Node | None = None, within: tuple = ()) -> DaptError:
    """One line for a failed `model.model_validate`: `path:line: field: problem`.

    `within` is where the validated mapping sits in the file (e.g. `("sweep", "proxy", "train")`);
    without `path` (a config built from flags) the line is left out. An unknown key usually
    explains the "missing" errors beside it (a typo), so it is reported first.
    """
    errors = sorted(err.errors(), key=lambda e: e["type"] != "extra_forbidden")
    first = errors[0]
    loc = (*within, *first["loc"])
    where = f"{path}:{line_of(root, loc)}: " if path is not None else ""
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return DaptError(f"{where}{dotted(loc)}: {_explain(first, model)}{more}")


def dotted(loc: tuple) -> str:
    """A field's path as users write it: `corpora[0].paths`."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def line_of(root: yaml.Node | None, loc: tuple) -> int:
    """Line (1-based) of the deepest YAML node found on `loc`: the bad key, or its parent."""
    node, line = root, 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if str(k.value) == str(part)), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _explain(error: dict, model: type[BaseModel]) -> str:
    """What is wrong; `error["loc"]` starts from `model`."""
    if error["type"] == "extra_forbidden":
        allowed = _allowed_keys(model, error["loc"][:-1])
        close = difflib.get_close_matches(str(error["loc"][-1]), allowed, n=1)
        hint = f"did you mean `{close[0]}`? " if close else ""
        return f"unknown key; {hint}allowed keys: {', '.join(allowed)}"
    if error["type"] == "missing":
        return "required field is missing"
    if error["type"] == "value_error":
        return error["msg"].removeprefix("Value error, ")
    return f"{error['msg']} (got {error['input']!r})"


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the config model found by walking `loc` from `model`."""
    for part in loc:
        if isinstance(part, int):
            continue
        annotation = model.model_fields[part].annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        model = next(c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel))
    return list(model.model_fields)
