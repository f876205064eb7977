"""Quantization stage: GPTQ, AWQ, RTN and AutoRound through llm-compressor, optionally behind
SmoothQuant, to a compressed-tensors scheme (W4A16 ... W8A8, FP8_DYNAMIC, NVFP4A16; schemes.py).

llm-compressor does the work; this module builds its recipe from a `Variant`, checks what
would fail late (group sizes, also a scheme's fixed groups) before any calibration, captures the
per-layer error and time llm-compressor reports (AutoRound: its per-block loss), and writes the
output directory atomically.
"""

from __future__ import annotations

import contextlib
import re
import time
from pathlib import Path
from typing import Any, Iterator

from quantstudy.config import Method, StudyConfig
from quantstudy.config.variants import Variant
from quantstudy.errors import QuantStudyError
from quantstudy.runtime.faults import failpoint
from quantstudy.stages.quantize_log import LayerReport, cpu_awq_pin_memory_fix
from quantstudy.runtime.modeldir import attempt_dir, publish
from quantstudy.records import MadeModel, Metric, ModelRecord, Note, Record
from quantstudy.stages.protocol import Job, StageName

GROUP_SIZES = (32, 64, 128)


def _ignored(name: str, patterns: tuple[str, ...]) -> bool:
    """llm-compressor's ignore semantics: exact/suffix module name, or `re:<regex>`."""
    for p in patterns:
        if p.startswith("re:") and re.match(p[3:], name):
            return True
        if name == p or name.endswith("." + p):
            return True
    return False


def linear_shapes(model_dir: Path, trust_remote_code: bool = False) -> dict[str, int]:
    """name -> in_features of every nn.Linear, built on the meta device (no weights loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return {n: m.in_features for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def check_group_size(shapes: dict[str, int], v: Variant) -> None:
    """Raise before calibration if a quantized layer's input width is not a multiple of the group."""
    if v.group_size is None:
        return
    targets = {n: k for n, k in shapes.items() if not _ignored(n, v.ignore)}
    bad = {n: k for n, k in targets.items() if k % v.group_size}
    if not bad:
        return
    ok = [g for g in GROUP_SIZES if all(k % g == 0 for k in targets.values())] + ["channel"]
    widths = sorted(set(bad.values()))
    names = list(bad)
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    raise QuantStudyError(
        f"variant {v.name}: group_size {v.group_size} does not divide the input width {widths} of "
        f"{len(bad)} layers ({shown})", field="quantize.group_size", value=v.group_size,
        fix=f"use group_size {' or '.join(map(str, ok))}, or add those layers to `ignore`")


def autoround_compile(v: Variant) -> bool:
    """AutoRound's torch.compile of its tuning loop: the study's choice, else on only with CUDA. On this
    CPU (torch 2.13) it works but costs more than it saves: a 2-block tiny Llama, 4 steps per block, took
    139 s compiled vs 13 s eager (load ~2); a SmolLM2 block at 20 steps takes ~15 s eager."""
    import torch

    want = v.autoround.enable_torch_compile
    return torch.cuda.is_available() if want is None else want


def build_recipe(v: Variant) -> list[Any]:
    from quantstudy.config.schemes import quantization_scheme

    actorder = v.gptq.actorder if v.method == Method.gptq and v.group_size else None
    scheme = quantization_scheme(v.scheme, v.bits, v.group_size, v.symmetric, actorder)
    groups = {"group_0": scheme}
    ignore = list(v.ignore)
    front: list[Any] = []
    if v.smoothquant is not None:  # moves activation outliers into the weights before they are quantized
        from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

        front = [SmoothQuantModifier(smoothing_strength=v.smoothquant, ignore=ignore)]
    if v.method == Method.gptq:
        from llmcompressor.modifiers.quantization import GPTQModifier

        # batched_quantization=None: one layer at a time, so each logged error names one layer
        return front + [GPTQModifier(config_groups=groups, ignore=ignore, dampening_frac=v.gptq.dampening_frac,
                                     block_size=v.gptq.block_size, actorder=scheme.weights.actorder,
                                     batched_quantization=None)]
    if v.method == Method.awq:
        from llmcompressor.modifiers.awq import AWQModifier

        return [AWQModifier(config_groups=groups, ignore=ignore, duo_scaling=v.awq.duo_scaling, n_grid=v.awq.n_grid)]
    if v.method == Method.autoround:
        from llmcompressor.modifiers.autoround import AutoRoundModifier

        a = v.autoround
        return front + [AutoRoundModifier(config_groups=groups, ignore=ignore, iters=a.iters, lr=a.lr,
                                          batch_size=a.batch_size, enable_torch_compile=autoround_compile(v))]
    from llmcompressor.modifiers.quantization import QuantizationModifier

    return front + [QuantizationModifier(config_groups=groups, ignore=ignore)]


def run_oneshot(model: Any, tokenizer: Any, v: Variant, dataset: Any | None, max_seq_len: int,
                out_dir: Path, report: LayerReport | None = None) -> tuple[dict[str, dict[str, float]], float]:
    """Quantize `model` in place with llm-compressor and save it compressed to `out_dir`.

    Returns (per-layer report, seconds spent in oneshot). The save goes to a temp dir that is
    renamed into place only when complete, so a killed run never leaves a half-written model.
    """
    from llmcompressor import oneshot

    report = report or LayerReport()
    kwargs: dict[str, Any] = {}
    if dataset is not None and v.method == Method.autoround and len({len(r) for r in dataset["input_ids"]}) > 1:
        raise QuantStudyError(f"variant {v.name}: AutoRound got calibration rows of different lengths, which "
                              "llm-compressor pads into its loss", fix="pass data.calibration.pack_rows(...)")
    if dataset is not None:
        kwargs = dict(dataset=dataset, num_calibration_samples=len(dataset), max_seq_length=max_seq_len,
                      shuffle_calibration_samples=False)  # our sampler already fixed the order
    failpoint("calibration")
    t0 = time.perf_counter()
    with report.capture(), (cpu_awq_pin_memory_fix() if v.method == Method.awq else contextlib.nullcontext()):
        oneshot(model=model, recipe=build_recipe(v), **kwargs)
    seconds = time.perf_counter() - t0
    tmp = attempt_dir(out_dir)  # this attempt's own folder, renamed into place when complete
    model.save_pretrained(tmp, save_compressed=True)
    tokenizer.save_pretrained(tmp)
    if not (tmp / "config.json").is_file():
        raise QuantStudyError(f"llm-compressor wrote no config.json for {v.name}", value=str(tmp),
                              fix="re-run with --debug and report the log")
    failpoint("save-model")
    publish(tmp, out_dir)
    return report.rows, seconds


def variant_spec(v: Variant) -> dict[str, Any]:
    """What a quantized model's record says about how it was made, from its variant alone (the
    calibration record and the bits per weight measured on the saved files join it in quantize_model)."""
    from quantstudy.config.schemes import info

    return {"method": v.method.value, "bits": v.bits, "group_size": v.group_size, "symmetric": v.symmetric,
            "ignore": list(v.ignore), "describe": v.describe(),
            "scheme": v.scheme.value if v.scheme else f"W{v.bits}A16",
            # False for entries that set only `bits`: the report pairs schemes only where a study named one
            "scheme_named": v.scheme is not None,
            "activations": info(v.scheme).activations if v.scheme else None,
            "smoothquant": v.smoothquant,
            "autoround": ({**v.autoround.model_dump(), "enable_torch_compile": autoround_compile(v)}
                          if v.method == Method.autoround else None),
            "gptq": v.gptq.model_dump() if v.method == Method.gptq else None,
            "awq": v.awq.model_dump() if v.method == Method.awq else None}


def quantize_model(ctx: Job) -> Iterator[Record]:
    """Quantize `ctx.model` with variant `ctx.variant` into `ctx.out_dir`; yields notes, then the made model."""
    from quantstudy.data.calibration import build_calibration, pack_rows, tokenize
    from quantstudy.runtime.modeldir import load_pretrained, weights_hash, weights_size
    from quantstudy.runtime.resources import track_peak_memory

    v, parent, name, out_dir = ctx.variant, ctx.model, ctx.name, ctx.out_dir
    trust = ctx.cfg.model.trust_remote_code
    check_group_size(linear_shapes(Path(parent.path), trust), v)  # before any calibration
    with track_peak_memory(ctx.device) as peak:
        model, tok = load_pretrained(Path(parent.path), ctx.device, ctx.cfg.model.dtype.value, trust)
        dataset, calib = None, None
        if v.calibration is not None:
            train_pool = None
            if v.calibration.source.value == "train":
                from quantstudy.data.heldout import plan_samples

                train_pool = plan_samples(ctx.cfg, ctx.data_dir, ctx.config_dir)[0]  # the samples the model was trained on
            calib = build_calibration(v.calibration, tok, ctx.data_dir, ctx.config_dir, train_pool,
                                      ctx.cfg.model.chat_template_kwargs)
            if v.method == Method.autoround:  # rows of one length: see pack_rows
                dataset = pack_rows(tokenize(calib, tok, None), v.calibration.max_seq_len)
                rows = f"packed into {len(dataset)} rows of {v.calibration.max_seq_len} tokens"
            else:
                dataset = tokenize(calib, tok, v.calibration.max_seq_len)
                rows = f"<= {v.calibration.max_seq_len} tokens each"
            yield Note(f"  calibration: {len(calib.ids)} {v.calibration.source.value} samples, {rows}, "
                       f"seed {v.calibration.seed}")
        report = LayerReport()
        rows, seconds = run_oneshot(model, tok, v, dataset,
                                    v.calibration.max_seq_len if v.calibration else 0, out_dir, report)
        del model
    metrics = [Metric("quantize.seconds", seconds, {"what": "llm-compressor oneshot wall time", "device": ctx.device}),
               Metric("quantize.peak_rss_bytes", peak.bytes, peak.info())]
    if v.method == Method.awq:  # how many smoothing mappings applied, and which were skipped and why
        skipped = max(report.awq_skipped_count, len(report.awq_skipped))
        metrics += [Metric("quantize.awq_mappings_applied", float(len(rows)), {"mappings": sorted(rows)}),
                    Metric("quantize.awq_mappings_skipped", float(skipped), {"skipped": report.awq_skipped})]
        if skipped:
            yield Note(f"  AWQ: {len(rows)} smoothing mappings applied, {skipped} skipped "
                       f"({'; '.join(sorted(set(report.awq_skipped.values()))) or 'incompatible shapes'})")
    from quantstudy.config.schemes import bits_per_weight

    if report.autoround_unquantized:  # said, not hidden: these layers stay full precision
        metrics.append(Metric("quantize.autoround_unquantized_layers",
                              float(sum(map(len, report.autoround_unquantized.values()))), report.autoround_unquantized))
        yield Note(f"  AutoRound left {sum(map(len, report.autoround_unquantized.values()))} layers unquantized")
    spec = {**variant_spec(v), **bits_per_weight(out_dir),
            "calibration": None if v.calibration is None else {
                "source": v.calibration.source.value, "samples": v.calibration.samples,
                "max_seq_len": v.calibration.max_seq_len, "seed": v.calibration.seed,
                "chat_template": v.calibration.chat_template,
                "chat_template_kwargs": ctx.cfg.model.chat_template_kwargs if v.calibration.chat_template else None,
                "fingerprint": calib.fingerprint if calib else None},
            "format": "compressed-tensors"}
    from quantstudy.runtime.environment import versions

    made = ModelRecord(name, "quantized", str(out_dir), parent=parent.name, spec=spec,
                       size_bytes=weights_size(out_dir), weights_hash=weights_hash(out_dir), versions=versions())
    yield MadeModel(made, metrics, layers=[(layer, r.get("error"), r.get("time")) for layer, r in rows.items()],
                    calibration=None if calib is None else list(zip(calib.ids, calib.hashes)))


class Stage:
    """Quantize: the key hashes the variant (method, scheme, bits, group, calibration, options)."""

    name = StageName.quantize

    def key_inputs(self, cfg: StudyConfig) -> tuple[object, ...]:
        return ()  # the variant itself joins the key (study.plan): one stage per variant

    def variant_key_inputs(self, v: Variant) -> tuple[object, ...]:
        """What else makes one variant's model: AutoRound's packed calibration rows (#22), so AutoRound
        models made before them (broken by padding) are made again, and no other variant's."""
        return ("autoround: packed calibration rows",) if v.method == Method.autoround else ()

    def run(self, job: Job) -> Iterator[Record]:
        return quantize_model(job)
