"""``vllm2 export --base B --merge A``: the exports of two runs that began at B and trained disjoint parts become one
model, each weight from the run that changed it; a weight both changed is refused by name and nothing is written."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from vllm2 import VisionLLMv2Model, VisionLLMv2Processor, build_model
from vllm2.cli.export import main as export_main


def _run(base, out, prefix: str, shift: float):
    """A "run" from ``base``: every weight under ``prefix`` shifted by ``shift``; saved to ``out``."""
    model = VisionLLMv2Model.from_pretrained(base)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.startswith(prefix) and tensor.is_floating_point():
                tensor.add_(shift)
    model.save_pretrained(out)
    VisionLLMv2Processor.from_pretrained(base).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_cfg, tiny_processor):
    root = tmp_path_factory.mktemp("merge")
    build_model(tiny_cfg).save_pretrained(root / "base")
    tiny_processor.save_pretrained(root / "base")
    return root, _run(root / "base", root / "gdino", "gdino.", 0.5), _run(root / "base", root / "pose", "keypoint.", 0.25)


def test_each_weight_comes_from_the_run_that_changed_it(runs, capsys):
    root, gdino, pose = runs
    assert export_main(["--model", str(pose), "--base", str(root / "base"), "--merge", str(gdino),
                        "--out", str(root / "merged")]) == 0
    merged = load_file(root / "merged" / "model.safetensors")
    base, a, b = (load_file(folder / "model.safetensors") for folder in (root / "base", gdino, pose))
    assert merged.keys() == base.keys()
    run, start = (VisionLLMv2Model.from_pretrained(f).state_dict() for f in (gdino, root / "base"))
    taken = sum(not torch.equal(run[n], start[n]) for n in start)  # by the model's names (tied weights: each name)
    assert f"took {taken} weights from {gdino}" in capsys.readouterr().out
    source = {name: a if name.startswith("gdino.") else b if name.startswith("keypoint.") else base for name in base}
    assert sum(not torch.equal(a[n], base[n]) for n in base) > 10 and sum(not torch.equal(b[n], base[n]) for n in base) > 10
    assert all(torch.equal(merged[name], source[name][name]) for name in base)
    VisionLLMv2Model.from_pretrained(root / "merged")  # a model folder


def test_a_weight_two_runs_changed_is_refused_by_name(runs, capsys):
    root, gdino, pose = runs
    both = _run(gdino, root / "both", "keypoint.", 0.125)  # changes gdino AND keypoint weights
    out = root / "refused"
    assert export_main(["--model", str(pose), "--base", str(root / "base"), "--merge", str(both),
                        "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "weight 'keypoint." in err and "changed by both the model and" in err and str(both) in err
    assert not out.exists() or not any(out.iterdir())


def test_merge_needs_its_base(runs, capsys):
    root, gdino, pose = runs
    assert export_main(["--model", str(pose), "--merge", str(gdino), "--out", str(root / "nobase")]) == 2
    assert "--merge and --base go together" in capsys.readouterr().err
    assert export_main(["--model", str(pose), "--base", str(root / "base"), "--out", str(root / "nomerge")]) == 2
    assert "--merge and --base go together" in capsys.readouterr().err


def test_a_run_that_changed_nothing_is_refused(runs, capsys):
    root, gdino, pose = runs
    base = str(root / "base")
    assert export_main(["--model", str(pose), "--base", base, "--merge", base, "--out", str(root / "empty")]) == 2
    assert f"{base!r} changed no weight of {base!r}" in capsys.readouterr().err
