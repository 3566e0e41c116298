"""Imports run one way: the floor (errors, the strict config base, the YAML loader with line
numbers, figure helpers, the workdir marker and lock) → each package's config → the experiment model → data_mix →
tokenizer → pretrain → launch, with no circle. Every import of every module counts, those inside functions too."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"dapt": "dapt", "data_mix": "dapt.data_mix", "tokenizer": "dapt.tokenizer", "pretrain": "dapt.pretrain",
            "launch": "dapt.launch"}
FLOOR = {"dapt", "dapt.base", "dapt.config_file", "dapt.figures", "dapt.workdir", "dapt.__main__"}
CONFIGS = {"dapt.data_mix.config", "dapt.tokenizer.config", "dapt.pretrain.config", "dapt.launch.config",
           "dapt.launch.sweep_config"}
ORDER = ["dapt.data_mix", "dapt.tokenizer", "dapt.pretrain", "dapt.launch"]


def layer(module: str) -> int:
    if module == "dapt.__main__":  # `python -m dapt`: the command itself, above everything
        return 3 + len(ORDER)
    if module in FLOOR:
        return 0
    if module in CONFIGS:
        return 1
    if module == "dapt.experiment":
        return 2
    return 3 + next(index for index, package in enumerate(ORDER) if module.startswith(package))


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "dapt":
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names if alias.name.split(".")[0] == "dapt"}
    return names


def test_every_import_runs_down_the_layers():
    found = modules()
    against = [f"{path.relative_to(ROOT)} imports {target} ({found[target].relative_to(ROOT)})"
               for name, path in found.items() for target in sorted(imports(path))
               if target in found and layer(target) > layer(name)]
    assert not against, "imports against the order floor → configs → experiment → data_mix → tokenizer → pretrain → " \
                        "launch:\n" + "\n".join(against)


def test_no_module_imports_itself_through_others():
    found = modules()
    graph = {name: {t for t in imports(path) if t in found and t != name} for name, path in found.items()}
    circles, done = set(), set()

    def walk(name: str, path: list[str]) -> None:  # depth first; a module met again on the path closes a circle
        for target in sorted(graph[name]):
            if target in path:
                circle = path[path.index(target):] + [target]
                circles.add(" → ".join(str(found[m].relative_to(ROOT)) for m in circle))
            elif target not in done:
                walk(target, path + [target])
        done.add(name)

    for name in sorted(graph):
        if name not in done:
            walk(name, [name])
    assert not circles, "import circles:\n" + "\n".join(sorted(circles))
