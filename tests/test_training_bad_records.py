"""``training.skip_bad_records`` keeps the task mix whole: a skipped record is replaced by another item of its task,
so under ZeRO-3 the rank that meets it still calls the decoders the other ranks gather (2 CPU processes, gloo)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vllm2.training import SubstituteBadRecords, TaskAlignedBatchSampler

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "data" / "examples"


class _Items:
    """A dataset of strings where the listed indices are skipped bad records (None)."""

    def __init__(self, tasks: list[str], bad: set[int]) -> None:
        self.tasks, self.bad, self.reads, self.epoch = tasks, bad, [], 0

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, index: int) -> str | None:
        self.reads.append(index)
        return None if index in self.bad else f"{self.tasks[index]}{index}"

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


def test_a_bad_record_is_replaced_by_the_next_item_of_its_task():
    tasks = ["a", "b", "a", "b", "a", "b"]
    items = _Items(tasks, bad={2, 5})
    data = SubstituteBadRecords(items, tasks)
    assert [data[i] for i in range(6)] == ["a0", "b1", "a4", "b3", "a4", "b1"]  # 2 -> 4; 5 wraps round to 1
    assert items.reads[2:4] == [2, 4]  # the bad record is read (so its reader counts it), then its stand-in
    data.set_epoch(3)
    assert items.epoch == 3
    with pytest.raises(ValueError, match="every one of the 2 items of task 'b' is a bad record"):
        SubstituteBadRecords(_Items(tasks[:4], bad={1, 3}), tasks[:4])[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_data(folder: Path) -> list[dict]:
    """Two chat items and two text-to-image items, the second of which names a missing image."""
    chats = [r for r in json.loads((EXAMPLES / "llava.json").read_text()) if r["id"] in ("single", "text")]
    (folder / "chat.json").write_text(json.dumps(chats))
    good = json.loads((EXAMPLES / "t2i.jsonl").read_text().splitlines()[0])
    bad = {"image": "missing.png", "caption": "a green circle"}
    (folder / "t2i.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    return [{"type": "llava", "path": str(folder / "chat.json"), "image_root": str(EXAMPLES / "images")},
            {"type": "t2i", "path": str(folder / "t2i.jsonl"), "image_root": str(EXAMPLES / "images")}]


def _run(cmd: list[str], timeout: float) -> tuple[int | None, str]:
    """Run ``cmd`` in its own process group; on timeout kill the whole group (a hang leaves no stray ranks)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log = proc.communicate(timeout=timeout)[0]
        return proc.returncode, log
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return None, proc.communicate()[0]


def test_zero3_two_ranks_one_meets_a_bad_record(tmp_path):
    """Items 0-1 are chat, 2-3 text-to-image (3 names a missing image). With this seed the one step pairs a chat item
    with a text-to-image item on each rank, and rank 1 draws item 3: dropping it would leave ``sd`` out of rank 1's
    step while rank 0 gathers ``sd``'s ZeRO-3 partitions (a hang); its stand-in keeps both ranks in step."""
    seed, tasks = 2, ["chat", "chat", "t2i", "t2i"]
    plan = [next(iter(TaskAlignedBatchSampler(tasks, 2, 2, rank, seed))) for rank in range(2)]
    assert [sorted(tasks[i] for i in batch) for batch in plan] == [["chat", "t2i"]] * 2 and 3 in plan[1], plan
    config = {
        "base": str(REPO / "configs" / "tiny.yaml"),
        "data": {"datasets": _write_data(tmp_path)},
        "training": {"output_dir": str(tmp_path / "run"), "max_steps": 1, "save_steps": 100, "logging_steps": 1,
                     "per_device_batch_size": 2, "warmup_ratio": 0.0, "seed": seed, "skip_bad_records": True,
                     "deepspeed": str(REPO / "configs" / "deepspeed" / "zero3.json")},
    }
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "vllm2.cli", "train", str(path), "--nproc", "2", "--master-port", str(_free_port())]
    code, log = _run(cmd, timeout=600)
    assert code == 0 and "Traceback" not in log, log[-6000:]
    assert log.count("skipping bad record") == 1 and "missing.png" in log, log[-6000:]
    assert log.count("final model:") == 1
