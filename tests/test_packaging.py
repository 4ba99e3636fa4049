"""The wheel: built from the repository, installed non-editable into a fresh venv, run from another directory.

The fresh venv sees this venv's dependencies through a ``.pth`` line (nothing is downloaded), so the test checks what
the wheel itself carries (code, presets, stage recipes, DeepSpeed and open_clip configs, the console script) and that
its dependency ranges accept the pinned versions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

from vllm2 import load_config

REPO = Path(__file__).resolve().parents[1]


def _run(*cmd: str | Path, cwd: Path) -> str:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_wheel_installed_elsewhere_runs_chat_with_its_presets(tmp_path):
    pip = [sys.executable, "-m", "pip"]
    _run(*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", REPO, cwd=REPO)
    (wheel,) = (tmp_path / "dist").glob("vllm2-*.whl")
    _run(sys.executable, "-m", "venv", "--without-pip", tmp_path / "venv", cwd=tmp_path)
    python = tmp_path / "venv" / "bin" / "python"
    site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(*pip, "--python", python, "install", "-q", "--no-deps", "--ignore-installed", wheel, cwd=tmp_path)
    assert "No broken requirements" in _run(*pip, "--python", python, "check", cwd=tmp_path)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = ("import json, vllm2, vllm2.config as c; from vllm2.config import resolve_deepspeed; "
             "print(json.dumps([vllm2.__file__, str(c.CONFIG_DIR), resolve_deepspeed('zero3'), "
             "c.load_config('shapes/stage2').training.max_steps]))")
    package, configs, zero3, steps = json.loads(_run(python, "-c", probe, cwd=elsewhere))
    assert package.startswith(str(site)) and configs == str(site / "vllm2" / "configs")
    assert json.loads(Path(zero3).read_text())["zero_optimization"]["stage"] == 3
    assert steps == load_config(REPO / "configs" / "shapes" / "stage2.yaml").training.max_steps  # via its bases
    out = _run(tmp_path / "venv" / "bin" / "vllm2", "chat", "--config", "tiny", "--prompt", "hello", "--json",
               "--max-new-tokens", "3", cwd=elsewhere)
    assert "text" in json.loads(out.strip().splitlines()[-1])
