"""What llm-compressor says while it quantizes, kept: per-layer errors and times from its log lines
(GPTQ, AWQ, AutoRound), and the one CPU workaround its AWQ needs. Used by stages/quantize.py."""

from __future__ import annotations

import ast
import contextlib
import logging
import re
from typing import Any, Iterator


@contextlib.contextmanager
def cpu_awq_pin_memory_fix() -> Iterator[None]:
    """llm-compressor 0.14 AWQ pins cached activations for faster host->GPU copies; on a
    machine without an accelerator `Tensor.pin_memory()` raises. Pinning only speeds up
    transfers, so skipping it on CPU changes no number. Remove when llm-compressor fixes it."""
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.cuda.is_available():
        yield
        return
    original = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, *a, **k: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = original  # type: ignore[method-assign]


class LayerReport:
    """Collects llm-compressor's per-layer log lines (GPTQ: time/error; AWQ: per-mapping errors)."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, float]] = {}
        self._current: str | None = None
        # AWQ smoothing mappings llm-compressor resolved but did not apply: smooth layer -> why.
        # GQA models (SmolLM2, Qwen3) skip v_proj -> o_proj in every layer: v_proj's output
        # (kv heads x head_dim) is narrower than o_proj's input (heads x head_dim), so one scale
        # vector cannot be folded from one into the other.
        self.awq_skipped: dict[str, str] = {}
        self.awq_skipped_count = 0  # from llm-compressor's own "N mappings were skipped" warning
        self.autoround_unquantized: dict[str, list[str]] = {}  # decoder block -> layers AutoRound kept float

    def sink(self, message: Any) -> None:
        r = message.record
        text = r["message"]
        if m := re.match(r"Quantizing 1 module\(s\): \['(.+)'\]", text):
            self._current = m.group(1)
        elif m := re.match(r"Applying AutoRound on layer (\S+)", text):  # loguru, before each decoder block
            self._current = m.group(1)
        elif r["level"].name == "METRIC" and self._current:
            if m := re.match(r"(time|error) ([0-9.eE+-]+)s?$", text):
                self.rows.setdefault(self._current, {})[m.group(1)] = float(m.group(2))
        elif m := re.match(r"Skipping (\S+) for mapping .* because (.+?)\.?$", text):
            self.awq_skipped[m.group(1)] = m.group(2)
        elif m := re.match(r"(\d+) mappings were skipped due to incompatible shapes", text):
            self.awq_skipped_count += int(m.group(1))
        elif text.startswith("AWQ per-mapping error metrics: "):
            try:
                data = ast.literal_eval(text.split(": ", 1)[1])  # a dict of plain numbers and names
            except (ValueError, SyntaxError):
                return
            for row in data.get("metrics", []):
                self.rows[row["layer_name"]] = {"error": float(row["best_error"]),
                                                "initial_error": float(row["initial_error"])}

    def autoround_record(self, record: logging.LogRecord) -> None:
        """auto_round's per-block result, through the standard `logging` module (logger "autoround"):
        'quantized 7/7 layers in the block, loss iter 0: 0.000123 -> iter 37: 0.000045'; the loss is
        the block's output MSE against the unquantized block, stored like GPTQ's per-layer error."""
        text = record.getMessage()
        if (u := re.match(r"Unquantized layers: (\[.*\])", text)) and self._current:
            try:  # layers of the block AutoRound left in float (shapes its kernels do not take)
                self.autoround_unquantized[self._current] = list(ast.literal_eval(u.group(1)))
            except (ValueError, SyntaxError):
                self.autoround_unquantized[self._current] = [u.group(1)]
        m = re.search(r"loss iter 0: ([0-9.eE+-]+) -> iter (\d+): ([0-9.eE+-]+)", text)
        if m and self._current:
            self.rows[self._current] = {"error": float(m.group(3)), "initial_error": float(m.group(1)),
                                        "best_iter": float(m.group(2))}

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        from loguru import logger

        handle = logger.add(self.sink, level="DEBUG", format="{message}")
        report = self

        class _Handler(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                report.autoround_record(record)

        ar, h = logging.getLogger("autoround"), _Handler(logging.INFO)
        ar.addHandler(h)  # auto_round's logger does not propagate; a handler of our own sees its lines
        try:
            yield
        finally:
            logger.remove(handle)
            ar.removeHandler(h)
