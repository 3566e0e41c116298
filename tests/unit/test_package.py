"""What `pip install dapt` installs: one top-level package, `dapt`, carrying its data files."""

import subprocess
import sys
import zipfile
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]


def test_the_wheel_holds_one_top_level_package_and_its_data(tmp_path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp_path), str(ROOT)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    with zipfile.ZipFile(next(tmp_path.glob("dapt-*.whl"))) as wheel:
        names = wheel.namelist()
        top_level = wheel.read(next(n for n in names if n.endswith(".dist-info/top_level.txt"))).decode().split()
    assert top_level == ["dapt"]
    assert all(name.startswith(("dapt/", "dapt-")) for name in names), [n for n in names if not n.startswith("dapt")]
    assert {"dapt/__main__.py", "dapt/base.py", "dapt/data_mix/schedule.c", "dapt/launch/cli.py", "dapt/configs/demo.yaml",
            "dapt/configs/bloomberggpt.yaml", "dapt/configs/tasks/headline_sentiment.yaml",
            "dapt/configs/tasks/headline_sentiment.jsonl"} <= set(names)


def test_python_m_dapt_is_the_dapt_command(tmp_path):
    result = subprocess.run([sys.executable, "-m", "dapt", "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Domain-adaptive pretraining." in result.stdout
