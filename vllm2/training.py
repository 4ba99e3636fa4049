"""Training recipe: HF ``Trainer`` (with its DeepSpeed integration), task-aligned batches, freezing and per-module
learning rates matched on module paths, per-decoder loss logs, export to a ``from_pretrained`` folder.

Task-aligned batches keep ZeRO-3 safe: at every step all ranks draw micro-batches with the SAME multiset of tasks
(from their own shard of each task's samples), so every rank calls the same decoders and no parameter all-gather is
left waiting. Micro-batches still mix tasks freely. With ``training.skip_bad_records`` a skipped record is replaced by
another item of its task (:class:`SubstituteBadRecords`), so the multiset stays the same on the rank that met it.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from .config import VLLM2Config, resolve_deepspeed

logger = logging.getLogger(__name__)

__all__ = ["SubstituteBadRecords", "TaskAlignedBatchSampler", "VLLM2Trainer", "apply_freeze", "init_from_export",
           "param_groups", "path_matches", "train"]


def path_matches(name: str, prefix: str) -> bool:
    """Whether parameter/module path ``name`` lies under ``prefix`` (whole dotted components: ``llm`` matches
    ``llm.model.x`` but not ``sd.llm2sd_mapper``)."""
    return name == prefix or name.startswith(prefix + ".")


def apply_freeze(model: nn.Module, prefixes: Sequence[str]) -> int:
    """Set ``requires_grad=False`` on parameters under any of ``prefixes``; returns how many were frozen."""
    names = dict(model.named_parameters())
    for prefix in prefixes:
        if not any(path_matches(n, prefix) for n in names):
            raise KeyError(f"config key training.freeze: {prefix!r} matches no parameter")
    frozen = 0
    for name, param in names.items():
        if any(path_matches(name, p) for p in prefixes):
            param.requires_grad_(False)
            frozen += 1
    return frozen


def init_from_export(model: nn.Module, folder: str | Path) -> list[str]:
    """Initialise ``model`` from a previous stage's export (a ``save_pretrained`` folder, read by ``from_pretrained``).

    Every tensor of the export must exist in ``model`` with the same shape (the LLM's plain and LoRA-wrapped names
    stand for each other); tensors it lacks (the modules this stage adds, such as decoders after a stage without
    them, or fresh LoRA adapters) keep their values. A tokenizer that adds tokens after the export's keeps its
    special tokens where they were: the export's rows of the LLM's embedding and head are copied and the added
    tokens' rows keep their initial values.

    Returns:
        The top-level modules of ``model`` the export did not have.
    """
    from .modeling import VisionLLMv2Model, onto_keys

    if not (Path(folder) / "config.json").is_file():
        raise FileNotFoundError(f"config key training.init_from: {str(folder)!r} is not a model folder "
                                "(no config.json)")
    exported = VisionLLMv2Model.from_pretrained(folder)
    ids, theirs = model.config.token_ids, exported.config.token_ids
    wrong = ", ".join(f"{t} is {i} there, {ids.get(t)} here" for t, i in theirs.items() if ids.get(t) != i)
    if wrong:
        raise ValueError(f"config key training.init_from: the special-token ids of {str(folder)!r} differ from this "
                         f"config's tokenizer ({wrong}); use the tokenizer it was trained with "
                         f"(llm.tokenizer={folder})")
    rows = exported.llm.get_input_embeddings().weight.shape[0]
    inside = sorted(t for t, i in ids.items() if t not in theirs and i < rows)
    if inside:
        raise ValueError(f"config key training.init_from: this config's tokens {inside} have ids inside the "
                         f"{rows}-token vocabulary of {str(folder)!r}, whose rows there stand for other tokens; added "
                         "tokens must come after the export's")
    own = model.state_dict()
    previous = _grow_vocabulary(model, onto_keys(exported.state_dict(), own), own)  # plain <-> LoRA-wrapped LLM
    alien = [k for k, v in previous.items() if k not in own or own[k].shape != v.shape]
    if alien:
        hint = (" (LoRA adapters: set llm.lora as the export had it, or merge them first with `vllm2 export "
                "--merge-lora`)" if any("lora_" in k for k in alien) else "")
        raise ValueError(f"config key training.init_from: {len(alien)} tensors of {str(folder)!r} have no place of "
                         f"that shape in this model, e.g. {alien[:5]}{hint}")
    model.load_state_dict(previous, strict=False)
    added = sorted({k.split(".")[0] for k in own if k not in previous})
    logger.info("initialised from %s; modules it did not have: %s", folder, added)
    return added


def _grow_vocabulary(model: nn.Module, previous: dict[str, torch.Tensor],
                     own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``previous`` with the LLM's embedding and head ``[V', C]`` of an export with fewer tokens grown to this model's
    ``[V, C]``: the export's rows first, then this model's rows of the added tokens."""
    llm = model.llm
    tables = {m.weight.data_ptr() for m in (llm.get_input_embeddings(), llm.get_output_embeddings()) if m is not None}
    grown = dict(previous)
    for key, value in previous.items():
        mine = own.get(key)
        if (mine is not None and mine.data_ptr() in tables and mine.shape[0] > value.shape[0]
                and mine.shape[1:] == value.shape[1:]):
            grown[key] = torch.cat([value, mine[value.shape[0]:]])  # [V, C]
    return grown


def param_groups(model: nn.Module, lr: float, weight_decay: float, multipliers: dict[str, float]) -> list[dict]:
    """AdamW groups: lr x the multiplier of the LONGEST matching path prefix; no weight decay on biases and norms."""
    for prefix in multipliers:
        if not any(path_matches(n, prefix) for n, _ in model.named_parameters()):
            raise KeyError(f"config key training.lr_multipliers: {prefix!r} matches no parameter")
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        matches = [p for p in multipliers if path_matches(name, p)]
        factor = multipliers[max(matches, key=len)] if matches else 1.0
        no_decay = param.ndim < 2 or "norm" in name.lower()
        groups.setdefault((lr * factor, 0.0 if no_decay else weight_decay), []).append(param)
    return [{"params": ps, "lr": group_lr, "weight_decay": wd} for (group_lr, wd), ps in groups.items()]


def _task_pools(tasks: Sequence[str]) -> dict[str, np.ndarray]:
    """Task name -> the indices of its items, ascending (tasks in sorted order)."""
    array = np.asarray(tasks)
    return {t: np.flatnonzero(array == t) for t in sorted(set(tasks))}


class TaskAlignedBatchSampler(Sampler[list[int]]):
    """Micro-batches whose task composition is the same on every rank at every step.

    Step ``s`` of epoch ``e`` draws ``batch_size`` task slots from the task weights with a generator seeded by
    ``(seed, e, s)`` (identical on all ranks); each rank fills every slot with the next sample of that task from its
    own shuffled shard. An epoch has ``ceil(len(dataset) / (batch_size * world_size))`` steps.

    Args:
        tasks: the task name of every dataset index.
        batch_size: samples per micro-batch.
        world_size / rank: data-parallel size and this rank.
        seed: base seed.
        weights: task -> sampling weight (default: proportional to the task's sample count).
    """

    def __init__(self, tasks: Sequence[str], batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 0,
                 weights: dict[str, float] | None = None) -> None:
        self.batch_size, self.world_size, self.rank, self.seed, self.epoch = batch_size, world_size, rank, seed, 0
        self.pools = _task_pools(tasks)
        self.names = list(self.pools)
        w = np.array([(weights or {}).get(t, len(self.pools[t])) for t in self.names], dtype=np.float64)
        self.probs = w / w.sum()
        self.num_steps = math.ceil(len(tasks) / (batch_size * world_size))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_steps

    def __iter__(self) -> Iterator[list[int]]:
        order = {}
        for k, task in enumerate(self.names):
            rng = np.random.default_rng([self.seed, self.epoch, k])
            pool = rng.permutation(self.pools[task])
            shard = pool[self.rank :: self.world_size]
            order[task] = shard if len(shard) else pool  # a task smaller than the world: ranks share its samples
        cursor = {t: 0 for t in self.names}
        for step in range(self.num_steps):
            slots = np.random.default_rng([self.seed, self.epoch, step, 1 << 20]).choice(
                len(self.names), size=self.batch_size, p=self.probs)
            batch = []
            for k in sorted(slots):
                task = self.names[k]
                batch.append(int(order[task][cursor[task] % len(order[task])]))
                cursor[task] += 1
            yield batch


class SubstituteBadRecords(Dataset):
    """A dataset whose skipped bad records (``None`` items) are replaced by the next readable item of the same task,
    in index order and wrapping around. A rank that drops the only sample of a task from its micro-batch would skip
    that decoder and, under ZeRO-3, leave the other ranks waiting in its parameter gathers; a substitute of the same
    task keeps every rank's task multiset (:class:`TaskAlignedBatchSampler`) whole. The reader still counts and
    reports the bad record.

    Args:
        dataset: the dataset (a :class:`~vllm2.data.Mixture` reading with ``skip_bad_records``).
        tasks: the task of every item.
    """

    def __init__(self, dataset: Any, tasks: Sequence[str]) -> None:
        if len(tasks) != len(dataset):
            raise ValueError(f"{len(tasks)} tasks for {len(dataset)} items")
        self.dataset, self.tasks, self.pools = dataset, list(tasks), _task_pools(tasks)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        task = self.tasks[index]
        pool = self.pools[task]
        start = int(np.searchsorted(pool, index))
        for step in range(len(pool)):
            sample = self.dataset[int(pool[(start + step) % len(pool)])]
            if sample is not None:
                return sample
        raise ValueError(f"every one of the {len(pool)} items of task {task!r} is a bad record (training."
                         "skip_bad_records); nothing can stand in for them")

    def set_epoch(self, epoch: int) -> None:
        """Pass the epoch on to the dataset."""
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)


class _LossMeans:
    """Running means of the LM loss and each decoder's loss terms between two log lines."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, loss_dict: dict[str, torch.Tensor], lm_loss: torch.Tensor | None) -> None:
        self.count += 1
        items = {k: float(v) for k, v in loss_dict.items()}
        if lm_loss is not None:
            items["lm"] = float(lm_loss.detach())
        for key, value in items.items():
            self.sums[key] = self.sums.get(key, 0.0) + value

    def pop(self) -> dict[str, float]:
        means = {f"loss/{k}": round(v / self.count, 6) for k, v in self.sums.items()} if self.count else {}
        self.sums, self.count = {}, 0
        return means


class _EpochSync(TrainerCallback):
    """Tells the dataset the epoch, so per-item sampling (phrasings, category subsets) changes between epochs."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(int(state.epoch or 0))


class _ClearStaleZero3Grads(TrainerCallback):
    """ZeRO-3 keeps each parameter's reduced gradient partition in one flat buffer and overwrites it only for the
    parameters that received a gradient, so a decoder absent from a step would be updated again with its previous
    gradient. Zeroing the buffer after every optimizer step makes absent modules get no update, as without ZeRO-3."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs) -> None:
        optimizer = getattr(self.trainer.model_wrapped, "optimizer", None)
        buffer = getattr(optimizer, "grad_partitions_flat_buffer", None)
        if buffer is not None:
            buffer.zero_()


class _WeightAverage(TrainerCallback):
    """Exponential moving average of the trainable weights (diffusers ``EMAModel``, fp32 shadows), stepped after every
    optimizer step and written into each checkpoint as ``ema.pt``, so a resumed run continues the same average."""

    FILE = "ema.pt"

    def __init__(self, model: nn.Module, decay: float, resume_from: Path | None) -> None:
        from diffusers.training_utils import EMAModel

        self.params = [p for p in model.parameters() if p.requires_grad]
        self.ema = EMAModel(self.params, decay=decay)
        self.ema.to(dtype=torch.float32)
        if resume_from is not None:
            path = resume_from / self.FILE
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no moving average to resume (training.ema_decay was 0 then?)")
            self.ema.load_state_dict(torch.load(path))

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self.ema.step(self.params)

    def on_save(self, args, state, control, **kwargs) -> None:
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            torch.save(self.ema.state_dict(), folder / self.FILE)

    def export(self, trainer: Trainer, folder: Path) -> None:
        """Save the model with the averaged weights to ``folder``; the trained weights are put back afterwards."""
        self.ema.store(self.params)
        self.ema.copy_to(self.params)
        trainer.save_model(str(folder))
        self.ema.restore(self.params)


class VLLM2Trainer(Trainer):
    """``Trainer`` with task-aligned batches, path-matched lr multipliers and per-decoder loss logs."""

    def __init__(self, *args: Any, project: VLLM2Config, tasks: Sequence[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.project = project
        self.tasks = list(tasks)
        self.loss_means = _LossMeans()
        self.add_callback(_EpochSync(self.train_dataset))
        self.add_callback(_ClearStaleZero3Grads(self))

    def get_train_dataloader(self) -> DataLoader:
        args = self.args
        sampler = TaskAlignedBatchSampler(self.tasks, args.per_device_train_batch_size, args.world_size,
                                          args.process_index, seed=args.seed)
        loader = DataLoader(self.train_dataset, batch_sampler=sampler, collate_fn=self.data_collator,
                            num_workers=args.dataloader_num_workers)
        prepared = self.accelerator.prepare(loader)
        wrapper = getattr(prepared, "batch_sampler", None)
        if wrapper is not None and getattr(wrapper, "batch_sampler", None) is sampler:
            wrapper.num_processes, wrapper.process_index = 1, 0  # the sampler is already rank-aware
        return prepared

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            t = self.project.training
            groups = param_groups(self.model, t.learning_rate, t.weight_decay, t.lr_multipliers)
            optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            kwargs.pop("lr", None)
            self.optimizer = optimizer_cls(groups, **kwargs)
        return self.optimizer

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Checkpoints hold the model as ``save_pretrained`` writes it: keys renamed (e.g. GroundingDINO's backbone)
        and tied weights left out, which ``Trainer``'s non-strict ``load_state_dict`` would silently skip. ``Trainer``
        calls this for a plain model (DeepSpeed restores its own files); its weights are read back through
        ``from_pretrained``, strictly. A wrapped model (FSDP, SageMaker) keeps the base behaviour."""
        if model is not None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        self.model.load_state_dict(type(self.model).from_pretrained(resume_from_checkpoint).state_dict())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs = {**logs, **self.loss_means.pop()}  # per-decoder losses beside the total
        super().log(logs, start_time)

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        outputs = model(**inputs)
        if model.training:
            self.loss_means.add(outputs.loss_dict or {}, outputs.lm_loss)
        return (outputs.loss, outputs) if return_outputs else outputs.loss


def training_arguments(cfg: VLLM2Config) -> TrainingArguments:
    """Map the project's training config onto ``TrainingArguments`` (bf16 on GPU, fp32 + gloo on CPU)."""
    t = cfg.training
    cuda = torch.cuda.is_available()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return TrainingArguments(
        output_dir=t.output_dir,
        per_device_train_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        warmup_steps=t.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        lr_scheduler_type="cosine",
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        save_steps=t.save_steps,
        save_strategy="steps",
        seed=t.seed,
        data_seed=t.seed,
        deepspeed=t.deepspeed and resolve_deepspeed(t.deepspeed),
        bf16=cuda,
        use_cpu=not cuda,
        ddp_backend="gloo" if not cuda and distributed else None,
        report_to=["tensorboard"],
        remove_unused_columns=False,
        dataloader_num_workers=t.dataloader_num_workers,
        disable_tqdm=False,
    )


def train(cfg: VLLM2Config, resume: bool | str | None = None) -> VLLM2Trainer:
    """Build the model and the data mixture from ``cfg``, train, and export the final model to ``OUTPUT_DIR/final``
    (with ``training.ema_decay`` > 0, the moving average of the weights also to ``OUTPUT_DIR/final-ema``).

    Args:
        cfg: the project config (``training`` and ``data`` sections).
        resume: True to continue from the latest checkpoint in ``training.output_dir``, or a checkpoint folder.
    Returns:
        The trainer (``trainer.model`` is the trained model, ``trainer.final_dir`` the export folder and
        ``trainer.ema_dir`` that of the averaged weights, or None).
    """
    from transformers import set_seed
    from transformers.integrations import is_deepspeed_zero3_enabled

    from .data import Collator, build_mixture
    from .modeling import build_model
    from .processor import VisionLLMv2Processor

    t = cfg.training
    set_seed(t.seed)
    # The model is built before the TrainingArguments switch on the DeepSpeed integration: ZeRO-3 then partitions
    # the whole, already built model when the engine starts (the LLM alone is not built inside zero.Init).
    model = build_model(cfg)
    model.load_pretrained_components()
    if t.init_from:
        init_from_export(model, t.init_from)
    if t.freeze:
        logger.info("froze %d parameter tensors under %s", apply_freeze(model, t.freeze), t.freeze)
    args = training_arguments(cfg)
    processor = VisionLLMv2Processor.from_config(cfg)
    dataset = build_mixture(cfg, processor.routes)
    train_dataset = SubstituteBadRecords(dataset, dataset.tasks) if t.skip_bad_records else dataset
    trainer = VLLM2Trainer(model=model, args=args, train_dataset=train_dataset,
                           data_collator=Collator(processor, t.max_length), project=cfg, tasks=dataset.tasks)
    average = None
    if t.ema_decay > 0:
        if is_deepspeed_zero3_enabled():
            raise ValueError("config key training.ema_decay: not supported under ZeRO-3 (partitioned weights)")
        checkpoint = get_last_checkpoint(t.output_dir) if resume is True else resume
        average = _WeightAverage(model, t.ema_decay, Path(checkpoint) if checkpoint else None)
        trainer.add_callback(average)
    trainer.train(resume_from_checkpoint=resume)
    trainer.final_dir = Path(t.output_dir) / "final"
    trainer.ema_dir = Path(t.output_dir) / "final-ema" if average else None
    trainer.save_model(str(trainer.final_dir))
    if average:
        average.export(trainer, trainer.ema_dir)
    if trainer.is_world_process_zero():
        for folder in filter(None, (trainer.final_dir, trainer.ema_dir)):
            processor.save_pretrained(folder)
    if dataset.bad_count:
        logger.warning("skipped %d bad records: %s", dataset.bad_count, dataset.bad_records[:20])
    return trainer
