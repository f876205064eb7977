"""SFT stage: TRL's SFTTrainer, full fine-tuning or LoRA (PEFT) merged into the weights.

`train_model(job)` trains the baseline on `cfg.train`'s samples (data/heldout.py plans them),
merges LoRA into float32 weights, saves safetensors + tokenizer to a temporary folder and
renames it to `job.out_dir`, and yields the trained model with its loss curve and metrics.

CPU speed (issue 8, benchmarks/train_speed.py): the defaults differ from TRL's only where that
changes speed and not, measurably, the loss: no gradient checkpointing (it recomputes every
forward to save memory a 0.1-1B model on CPU does not need), LoRA dropout 0 (its random masks
cost a quarter of a CPU step), one row per forward pass on CPU (`rows_per_forward`: the same
random batches, their gradients accumulated, no padding) and the loss head only where a token
carries loss, computed densely (train_head.py). Float32 by default: bf16 autocast
(`bf16_autocast: true`) is faster but trained SmolLM2 to a held-out loss 0.003 nats/token above
float32 at each of 3 seeds.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from quantstudy.runtime import modeldir as models
from quantstudy.data import train_data
from quantstudy.data.heldout import plan_samples
from quantstudy.config import StudyConfig, TrainConfig, TrainMethod
from quantstudy.records import MadeModel, Metric, Note, Record
from quantstudy.runtime import environment
from quantstudy.stages.protocol import Job, QuietProgress, StageName
from quantstudy.errors import QuantStudyError
from quantstudy.runtime.resources import track_peak_memory
from quantstudy.data.conversations import Conversation
from quantstudy.store import ModelRecord
from quantstudy.stages.train_head import head_on_labelled_positions


class RichProgress(TrainerCallback):
    """Steps, last loss, elapsed and remaining time in the driver's progress view."""

    def __init__(self, progress: Any = None, label: str = "SFT"):
        self.progress, self.label, self.task = progress or QuietProgress(), label, None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.task = self.progress.add_task(self.label, total=state.max_steps, completed=state.global_step)

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.task is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any) -> None:
        if self.task is not None and logs and "loss" in logs:
            self.progress.update(self.task, description=f"{self.label} · loss {logs['loss']:.4f}")


def bf16_supported(device: str) -> bool:
    """bf16 autocast pays off only with native bf16 matmuls (AVX512-BF16/AMX on CPU; Ampere+ GPUs)."""
    if device == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def sft_args(cfg: TrainConfig, out: Path, device: str, **overrides: Any) -> Any:
    """TRL SFTConfig for `cfg`; `overrides` replace any field (the benchmark's baseline recipe uses them)."""
    from trl import SFTConfig

    # The random sampler's permutation does not depend on the batch size, so rows_per_forward r
    # with batch_size x grad_accum / r accumulation steps puts the same rows in each optimizer step.
    r = cfg.forward_rows(device)
    per_device, accum = r, cfg.batch_size * cfg.grad_accum // r
    sampling = "group_by_length" if cfg.group_by_length else "random"
    kw: dict[str, Any] = dict(
        output_dir=str(out), per_device_train_batch_size=per_device, gradient_accumulation_steps=accum,
        num_train_epochs=cfg.epochs, max_steps=cfg.max_steps or -1, learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup_ratio,  # < 1 = share of the steps
        seed=cfg.seed, data_seed=cfg.seed, max_length=cfg.max_seq_len, completion_only_loss=cfg.completion_only_loss,
        bf16=cfg.bf16_autocast and bf16_supported(device), fp16=False, gradient_checkpointing=False,
        train_sampling_strategy=sampling,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=device == "cpu",
        dataloader_num_workers=0, include_num_input_tokens_seen="non_padding")
    kw.update(overrides)
    return SFTConfig(**kw)


def lora_config(cfg: TrainConfig) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")


def run_sft(model: Any, tok: Any, samples: list[Conversation], cfg: TrainConfig, args: Any,
            progress: Any = None, label: str = "SFT", resume: str | None = None,
            chat_kwargs: dict[str, Any] | None = None) -> Any:
    """Train in place with SFTTrainer (from checkpoint `resume` if given); returns the trainer
    (its .model is a PeftModel for LoRA)."""
    import datasets
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import SFTTrainer

    chat = cfg.chat_template
    if chat and not getattr(tok, "chat_template", None):
        raise QuantStudyError("the model's tokenizer has no chat template", field="train.chat_template", value=True,
                              fix="set `train.chat_template: false` to train on plain 'Question:/Answer:' text")
    ds = Dataset.from_list(train_data.as_records(samples, chat, chat_kwargs))
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # TRL's tokenizing passes take < 1 s; our bar shows the training
    try:
        trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                             peft_config=lora_config(cfg) if cfg.method == TrainMethod.lora else None,
                             callbacks=[RichProgress(progress, label)])
    finally:
        if bars:
            datasets.enable_progress_bars()
    trainer.remove_callback(PrinterCallback)  # it prints every log dict; RichProgress shows them
    with head_on_labelled_positions():
        trainer.train(resume_from_checkpoint=resume)
    return trainer


def merge_adapter(base: Any, trained: Any) -> Any:
    """Merge `trained`'s LoRA adapter into `base` (a fresh float32 copy of the weights it was
    trained on): W + (alpha / r) * B @ A in float32, not in the bf16 copy used for training."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    target = get_peft_model(base, trained.peft_config["default"])
    state = {k: v.detach().to("cpu", torch.float32) for k, v in get_peft_model_state_dict(trained).items()}
    result = set_peft_model_state_dict(target, state)
    assert not result.unexpected_keys, result.unexpected_keys
    return target.merge_and_unload()


def fit(model_dir: Path, samples: list[Conversation], cfg: TrainConfig, device: str, progress: Any,
        work: Path, resume: str | None = None, label: str = "SFT", trust_remote_code: bool = False,
        chat_kwargs: dict[str, Any] | None = None, **overrides: Any) -> tuple[Any, Any, Any]:
    """Train the model in `model_dir`; returns (trainer, merged float32 model, tokenizer)."""
    args = sft_args(cfg, work, device, **overrides)
    lora = cfg.method == TrainMethod.lora
    # LoRA + bf16: the frozen base is held in bf16, so autocast does not re-cast every weight at every
    # step (SmolLM2 on CPU: 15% faster than float32 weights under autocast; matmuls see the same bf16
    # values either way). Trained weights (the adapter, or all weights in full fine-tuning) stay float32.
    frozen_bf16 = lora and bool(args.bf16)
    model, tok = models.load_pretrained(model_dir, dtype="bfloat16" if frozen_bf16 else "float32",
                                        trust_remote_code=trust_remote_code)
    trainer = run_sft(model, tok, samples, cfg, args, progress, label, resume, chat_kwargs)
    if not lora:
        return trainer, trainer.model, tok
    if not frozen_bf16:
        return trainer, trainer.model.merge_and_unload(), tok
    base, _ = models.load_pretrained(model_dir, dtype="float32", trust_remote_code=trust_remote_code)
    return trainer, merge_adapter(base, trainer.model), tok


def loss_curve(trainer: Any) -> list[tuple[float, float]]:
    return [(float(e["step"]), float(e["loss"])) for e in trainer.state.log_history if "loss" in e and "step" in e]


def describe(cfg: TrainConfig, n: int, bf16: bool = False) -> str:
    how = f"LoRA r{cfg.lora.r}" if cfg.method == TrainMethod.lora else "full"
    span = f"{cfg.max_steps} steps" if cfg.max_steps else f"{cfg.epochs:g} epoch(s)"
    return f"SFT ({how}, {'bf16 autocast' if bf16 else 'float32'}), {n} {cfg.source.value} samples, {span}"


def save_model(model: Any, tok: Any, out_dir: Path, dtype: str) -> None:
    """Write to this attempt's own folder, then rename: a killed run never leaves a half-written model."""
    tmp = models.attempt_dir(out_dir)
    model.to(getattr(torch, dtype)).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    models.check_model_dir(tmp, field="train")
    models.publish(tmp, out_dir)


def train_model(ctx: Job) -> Iterator[Record]:
    """Train `ctx.model` into `ctx.out_dir`; yields notes, then the trained model with its curve and metrics."""
    import peft
    import trl

    base, out_dir, name = ctx.model, ctx.out_dir, ctx.name
    cfg = ctx.cfg.train
    samples, held_out = plan_samples(ctx.cfg, ctx.data_dir, ctx.config_dir)
    if held_out:
        yield Note(f"[dim]train: {held_out} pool rows held out because the study evaluates them[/]")
    ids_hash = hashlib.sha256("\n".join(c.text_hash for c in samples).encode()).hexdigest()[:16]
    # Checkpoints (adapter or weights + optimizer + RNG state) at every fifth of the run, in a
    # folder named by everything that shapes the run: a killed training resumes where it stopped.
    run_key = hashlib.sha256(json.dumps([cfg.model_dump(mode="json"), ids_hash, base.weights_hash or base.path,
                                         ctx.device]).encode()).hexdigest()[:16]
    work = ctx.work_dir / f"sft-{run_key}"
    resume = get_last_checkpoint(str(work)) if work.is_dir() else None
    if resume:
        yield Note(f"[dim]train: resuming from {Path(resume).name}[/]")
    t0 = time.perf_counter()
    with track_peak_memory(ctx.device) as mem:
        trainer, merged, tok = fit(Path(base.path), samples, cfg, ctx.device, ctx.progress, work, resume,
                                   trust_remote_code=ctx.cfg.model.trust_remote_code,
                                   chat_kwargs=ctx.cfg.model.chat_template_kwargs,
                                   save_strategy="steps", save_steps=0.2, save_total_limit=1)
    seconds = time.perf_counter() - t0
    args = trainer.args
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    save_model(merged, tok, out_dir, ctx.cfg.model.dtype.value)
    shutil.rmtree(work, ignore_errors=True)

    curve = loss_curve(trainer)
    tokens = int(trainer.state.num_input_tokens_seen)
    how = {"device": ctx.device, "bf16_autocast": bool(args.bf16), "steps": trainer.state.global_step,
           "rows_per_forward": args.per_device_train_batch_size,
           "resumed_from": Path(resume).name if resume else None}  # seconds cover this process's part only
    metrics = [Metric("train.seconds", seconds, how),
               Metric("train.final_loss", curve[-1][1] if curve else None, {"step": curve[-1][0] if curve else None}),
               Metric("train.peak_rss_bytes", mem.bytes, mem.info()),
               Metric("train.tokens", tokens, {"counted": "non-padding input tokens"})]
    spec = {"train": cfg.model_dump(mode="json"), "samples": len(samples), "samples_hash": ids_hash,
            "held_out": held_out, "bf16_autocast": bool(args.bf16), "steps": trainer.state.global_step,
            "describe": describe(cfg, len(samples), bool(args.bf16))}
    versions = {**environment.versions(), "trl": trl.__version__, "peft": peft.__version__}
    made = ModelRecord(name=name, role="trained", path=str(out_dir), parent=base.name, spec=spec,
                       size_bytes=models.weights_size(out_dir), weights_hash=models.weights_hash(out_dir),
                       versions=versions)
    yield MadeModel(made, metrics, series={"loss": curve})


class Stage:
    """Train: the key hashes the `train:` section (data, method, steps, seed, ...)."""

    name = StageName.train

    def key_inputs(self, cfg: StudyConfig) -> tuple[object, ...]:
        return (cfg.train,)

    def run(self, job: Job) -> Iterator[Record]:
        return train_model(job)
