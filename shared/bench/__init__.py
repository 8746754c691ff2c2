"""`splitvlm bench`: split inference vs sending the image, measured in one run.

run.py        the measurements (split codecs, image-codec baselines, timings, throttled link)
timings.py    per-stage samples and their median / p95
baselines.py  image codecs for cloud-only inference (JPEG, WebP, PNG at the model's input size)
latency.py    end-to-end latency model (compute + RTT + bytes / rate) and a throttled TCP proxy
report.py     JSON + Markdown + PNG plots
"""

from shared.bench.run import BenchConfig, run_bench

__all__ = ["BenchConfig", "run_bench"]
