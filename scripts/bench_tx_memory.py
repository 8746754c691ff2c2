"""Peak memory of the SmolVLM-256M Tx half against the whole model.

Builds the SmolVLM-256M-Instruct architecture (the real config, tokenizer and processor from
``../shared/models/smolvlm-256m-instruct``; random weights) into a temporary folder as
safetensors, then, each in a fresh Python process, loads

- the Tx half (`shared.split.load_tx_half`) at ``after_vision_tower`` and at ``after_projector``;
- the full model (``Idefics3ForConditionalGeneration.from_pretrained``);

and reports the peak resident set size (``VmHWM``) of each process, its RSS after the imports
(the baseline, identical in all of them) and the peak above that baseline, with the Tx/full
ratios. The target is a Tx peak of at most 40% of the full model's.

    python scripts/bench_tx_memory.py [--dtype bfloat16|float32] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TARGET = 0.40


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    import resource  # not Linux: ru_maxrss (KiB on Linux, bytes on macOS) for the peak

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _child(kind: str, folder: str) -> None:
    """Runs in a fresh process: import, note the baseline, load one thing, report the peak."""
    import torch
    from transformers import Idefics3ForConditionalGeneration

    from shared.split import SplitPoint, load_tx_half

    torch.set_num_threads(1)
    baseline = _status_kib("VmRSS")
    t0 = time.perf_counter()
    if kind == "full":
        model = Idefics3ForConditionalGeneration.from_pretrained(folder, dtype="auto")
        tensors = list(model.parameters())
    else:
        half = load_tx_half(Path(folder), SplitPoint(kind))
        tensors = [p for m in half.torch_modules() for p in m.parameters()]  # type: ignore[attr-defined]
    seconds = time.perf_counter() - t0
    loaded_peak = _status_kib("VmHWM")
    # Both load paths memory-map the safetensors file: weights become resident only when read.
    # Read every weight once (a reduction allocates nothing), as the first forward pass would.
    with torch.inference_mode():
        for p in tensors:
            p.sum()
    print(
        json.dumps(
            {
                "kind": kind,
                "params": sum(p.numel() for p in tensors),
                "baseline_kib": baseline,
                "loaded_peak_kib": loaded_peak,
                "peak_kib": _status_kib("VmHWM"),
                "load_s": round(seconds, 2),
            }
        )
    )


def _measure(kind: str, folder: Path) -> dict[str, float]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, str(folder)],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def _mib(kib: float) -> str:
    return f"{kib / 1024:8.1f} MiB"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--keep", type=Path, help="build the checkpoint here and keep it")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child)
        return 0

    import torch

    from shared.models.tiny_idefics3 import SMOLVLM_256M_DIR, build_smolvlm_random

    if not (SMOLVLM_256M_DIR / "config.json").is_file():
        print(f"SmolVLM-256M-Instruct files not found at {SMOLVLM_256M_DIR}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="splitvlm-bench-") as tmp:
        folder = args.keep or Path(tmp) / "smolvlm-256m-random"
        if not (folder / "model.safetensors").is_file():
            t0 = time.perf_counter()
            build_smolvlm_random(folder, dtype=getattr(torch, args.dtype), silence_special_tokens=False)
            print(f"built {folder} ({args.dtype}) in {time.perf_counter() - t0:.1f} s")
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        print(f"checkpoint: {size / 2**20:.1f} MiB of safetensors")

        results = {kind: _measure(kind, folder) for kind in ("after_vision_tower", "after_projector", "full")}
    full = results["full"]
    full_delta = full["peak_kib"] - full["baseline_kib"]
    print(
        f"\n{'':20} {'params':>12} {'baseline':>13} {'peak, loaded':>13} {'peak, read':>13} "
        f"{'read-baseline':>13} {'load':>7}"
    )
    for kind, r in results.items():
        delta = r["peak_kib"] - r["baseline_kib"]
        print(
            f"{kind:20} {int(r['params']):12,d} {_mib(r['baseline_kib'])} {_mib(r['loaded_peak_kib'])} "
            f"{_mib(r['peak_kib'])} {_mib(delta)} {r['load_s']:6.1f}s"
        )
    print(
        "baseline: RSS after the imports; peak, loaded: VmHWM right after loading (memory-mapped "
        "weights not yet read); peak, read: VmHWM after reading every weight once"
    )
    ok = True
    for kind in ("after_vision_tower", "after_projector"):
        r = results[kind]
        raw = r["peak_kib"] / full["peak_kib"]
        delta = (r["peak_kib"] - r["baseline_kib"]) / full_delta
        ok = ok and delta <= TARGET
        print(
            f"Tx {kind}: peak {raw:.1%} of the full model's; above the import baseline {delta:.1%} "
            f"(target <= {TARGET:.0%})"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
