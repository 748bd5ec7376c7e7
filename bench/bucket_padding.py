"""What padding to the batch buckets costs (c2), from step times: a model, not a measurement.

Replays (c1) (N jobs at once, 25 steps) and (c2) (N arrivals at twice the rate (c1) served
them, 15/25/40 steps in turn), stepping every active sample each step as the engine does,
at the step time of the bucket the rows are padded to, plus a decode per finished image.
Step times come from a bench/throughput.py JSON (`compiled_step_ms_by_rows`, measured at
every captured bucket; a bucket between two measured ones is interpolated between them), or
else from a line through run 2's two H100 points (2 rows 6.5 ms, 32 rows 69.2 ms). Prints
(c2)/(c1) with the buckets as measured or given, and with none.

    python bench/bucket_padding.py [--json throughput_gpu.json] [--buckets 2,4,8,12,16,20,24,28,32]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

# Run 2's compiled step on the H100 (README, Performance), and run 4's 16-image decode.
LINE_MS = (2.3, 2.09)  # intercept, per row
DECODE_S = 0.15 / 16
FINISH_S = 0.02  # the host's end of a step that finished jobs
# worker.runners.sd.default_batch_buckets for a compiled batch of 16 (not imported: no torch here).
WORKER_BUCKETS = (2, 4, 8, 12, 16, 20, 24, 28, 32)


def makespan(step_s: Callable[[int], float], steps: list[int], interval: float) -> float:
    """Seconds from the first arrival to the last image, each active sample stepped each step."""
    left, done, active, arrived, now = list(steps), [0.0] * len(steps), set(), 0, 0.0
    while arrived < len(steps) or active:
        while arrived < len(steps) and arrived * interval <= now:
            active.add(arrived)
            arrived += 1
        if not active:
            now = arrived * interval
            continue
        now += step_s(2 * len(active))  # guided: two rows a sample
        finished = [j for j in active if left[j] == 1]
        for j in active:
            left[j] -= 1
        if finished:
            now += FINISH_S + DECODE_S * len(finished)
            for j in finished:
                active.discard(j)
                done[j] = now
    return max(done)


def ratio(step_s: Callable[[int], float], n: int) -> tuple[float, float]:
    c1 = makespan(step_s, [25] * n, 0.0)
    c2 = makespan(step_s, [(15, 25, 40)[i % 3] for i in range(n)], c1 / (2 * n))
    return c1, c2


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, help="a bench/throughput.py result with compiled_step_ms_by_rows")
    p.add_argument("--buckets", help="row counts, comma-separated (default: those measured, else the worker's default for a batch of 16)")
    p.add_argument("--n", type=int, default=16)
    args = p.parse_args()
    measured: dict[int, float] = {}
    if args.json:
        measured = {int(k): v / 1000 for k, v in json.loads(args.json.read_text())["compiled_step_ms_by_rows"].items()}
    line = lambda rows: (LINE_MS[0] + LINE_MS[1] * rows) / 1000  # noqa: E731
    buckets = sorted(int(b) for b in args.buckets.split(",")) if args.buckets else sorted(measured) or list(WORKER_BUCKETS)

    def at(rows: int) -> float:
        """The step at `rows`: measured, else between the measured rows around it, else the line."""
        if rows in measured:
            return measured[rows]
        below = max((r for r in measured if r < rows), default=None)
        above = min((r for r in measured if r > rows), default=None)
        if below is None or above is None:
            return line(rows)
        share = (rows - below) / (above - below)
        return measured[below] + share * (measured[above] - measured[below])

    def padded(rows: int) -> float:
        return at(next((b for b in buckets if b >= rows), rows))

    source = f"measured ({args.json})" if measured else "a line through run 2's 2- and 32-row steps (a model)"
    print(f"step times: {source}; N = {args.n}")
    for name, step in ((f"buckets {','.join(map(str, buckets))}", padded), ("no padding", at)):
        c1, c2 = ratio(step, args.n)
        print(f"  {name:40s} (c1) {c1:.3f} s  (c2) {c2:.3f} s  (c2)/(c1) throughput {c1 / c2:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
