"""End-to-end training: one process, and 2 CPU processes (gloo) under DeepSpeed ZeRO-2 and ZeRO-3 on a mixed-task
dataset (VQA + det + pose + gen + edit); checkpoints, exact resume, export."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from vllm2 import VisionLLMv2Model, VisionLLMv2Processor, build_model, load_config
from vllm2.data import Collator, build_mixture

REPO = Path(__file__).resolve().parents[1]
DATASETS = [
    {"type": "llava", "path": "llava.json", "image_root": "images"},
    {"type": "coco", "path": "coco_instances.json", "image_root": "images", "task": "instance_seg"},
    {"type": "coco_keypoints", "path": "coco_keypoints.json", "image_root": "images"},
    {"type": "t2i", "path": "t2i.jsonl", "image_root": "images"},
    {"type": "edit", "path": "edit.jsonl", "image_root": "images"},
]


def _write_config(tmp_path: Path, out: Path, steps: int, save: int, deepspeed: str | None) -> Path:
    data = {
        "base": str(REPO / "configs" / "tiny.yaml"),
        "data": {"root": str(REPO / "data" / "examples"), "datasets": DATASETS},
        "training": {"output_dir": str(out), "max_steps": steps, "save_steps": save, "logging_steps": 1,
                     "per_device_batch_size": 2, "learning_rate": 3.0e-4, "max_grad_norm": 0.1, "warmup_ratio": 0.0,
                     "deepspeed": deepspeed},
    }
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(config: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "vllm2.cli", "train", str(config), "--nproc", "2", "--master-port", str(_free_port()),
           *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-6000:]
    return proc


def _losses(checkpoint: Path) -> dict[int, float]:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}


def _fixed_batch_loss(model, cfg) -> float:
    processor = VisionLLMv2Processor.from_config(cfg)
    dataset = build_mixture(cfg, processor.routes, mode="teacher_forced")
    batch = Collator(processor)([dataset[i] for i in range(len(dataset))])
    torch.manual_seed(0)
    with torch.no_grad():
        return float(model.train()(**batch).loss)


def test_single_process_training_exports_the_trained_model(tmp_path):
    from vllm2.training import train

    cfg = load_config(_write_config(tmp_path, tmp_path / "single", steps=2, save=100, deepspeed=None))
    trainer = train(cfg)
    exported = VisionLLMv2Model.from_pretrained(trainer.final_dir).eval()
    processor = VisionLLMv2Processor.from_pretrained(trainer.final_dir)
    batch = Collator(processor)([build_mixture(cfg, processor.routes, mode="teacher_forced")[0]])
    with torch.no_grad():
        assert torch.equal(trainer.model.eval()(**batch).logits, exported(**batch).logits)
    assert any(k.startswith("loss/") for e in trainer.state.log_history for k in e)  # per-decoder losses logged


@pytest.mark.parametrize("stage", ["zero2", "zero3"])  # the shipped configs, by name
def test_two_process_deepspeed_training_resumes_exactly(tmp_path, stage):
    run = tmp_path / "run"
    proc = _launch(_write_config(tmp_path, run, steps=6, save=3, deepspeed=stage))
    assert proc.stdout.count("final model:") == 1  # printed by rank 0 only
    full = _losses(run / "checkpoint-6")
    assert sorted(full) == list(range(1, 7))

    cfg = load_config(_write_config(tmp_path, run, steps=6, save=3, deepspeed=None))
    torch.manual_seed(0)
    initial = _fixed_batch_loss(build_model(cfg), cfg)
    trained = _fixed_batch_loss(VisionLLMv2Model.from_pretrained(run / "final"), cfg)
    assert trained < initial, (initial, trained)

    resumed = tmp_path / "resumed"
    _launch(_write_config(tmp_path, resumed, steps=6, save=3, deepspeed=stage), "--resume", str(run / "checkpoint-3"))
    again = _losses(resumed / "checkpoint-6")
    assert sorted(again) == [1, 2, 3, 4, 5, 6]  # continued from step 3, history kept
    for step in (4, 5, 6):
        assert again[step] == pytest.approx(full[step], rel=1e-5, abs=1e-6), (step, again, full)


def test_deepspeed_launcher_with_a_hostfile_trains_as_torchrun_does(tmp_path):
    """``--launcher deepspeed --hostfile H --no-ssh`` (localhost, 2 slots) against the torchrun path: same losses."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    runs = {name: tmp_path / name for name in ("torchrun", "deepspeed")}
    _launch(_write_config(tmp_path, runs["torchrun"], steps=3, save=3, deepspeed="zero2"))
    _launch(_write_config(tmp_path, runs["deepspeed"], steps=3, save=3, deepspeed="zero2"),
            "--launcher", "deepspeed", "--hostfile", str(hostfile), "--no-ssh")
    by_torchrun, by_deepspeed = (_losses(run / "checkpoint-3") for run in runs.values())
    assert sorted(by_deepspeed) == [1, 2, 3]
    assert by_deepspeed == pytest.approx(by_torchrun, rel=1e-5, abs=1e-6)


def test_moving_average_export_follows_the_checkpoints_and_survives_a_resume(tmp_path):
    """final-ema = the EMA (diffusers' schedule: decay 0 at step 1, then min(decay, (1+s)/(10+s)) at step s+1) of
    the weights saved after every step; a single-process run resumed from checkpoint-2 (its weights read back with
    their saved key names) repeats step 3 exactly and exports the same average."""
    from vllm2.training import _WeightAverage, train

    def run(name: str, resume: str | None = None) -> dict[str, torch.Tensor]:
        path = _write_config(tmp_path, tmp_path / name, steps=3, save=1, deepspeed=None)
        return weights(train(load_config(path, ["training.ema_decay=0.2"]), resume=resume).ema_dir)

    def weights(folder: Path) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in VisionLLMv2Model.from_pretrained(folder).named_parameters()}

    def average(snapshots: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        expected = dict(snapshots[0])
        for step, snapshot in enumerate(snapshots[1:], start=1):
            decay = min(0.2, (1 + step) / (10 + step))
            expected = {n: decay * expected[n] + (1 - decay) * w for n, w in snapshot.items()}
        return expected

    exported = run("ema")
    snapshots = [weights(tmp_path / "ema" / f"checkpoint-{k}") for k in (1, 2, 3)]
    moved = [n for n in exported if not torch.equal(snapshots[0][n], snapshots[-1][n])]
    assert moved and not any(torch.equal(exported[n], snapshots[-1][n]) for n in moved)  # not the last weights
    for n, w in average(snapshots).items():
        torch.testing.assert_close(exported[n], w, rtol=1e-5, atol=1e-7, msg=n)

    resumed = run("resumed", resume=str(tmp_path / "ema" / "checkpoint-2"))
    full, again = _losses(tmp_path / "ema" / "checkpoint-3"), _losses(tmp_path / "resumed" / "checkpoint-3")
    assert again[3] == pytest.approx(full[3], rel=1e-5, abs=1e-6), (again, full)
    for n, w in exported.items():
        torch.testing.assert_close(resumed[n], w, rtol=1e-5, atol=1e-7, msg=n)

    (tmp_path / "ema" / "checkpoint-1" / "ema.pt").unlink()  # as in a checkpoint of a run without the average
    with pytest.raises(FileNotFoundError, match="checkpoint-1/ema.pt"):
        _WeightAverage(build_model(load_config("tiny")), 0.2, tmp_path / "ema" / "checkpoint-1")
