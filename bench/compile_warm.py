"""Where a torch.compile'd UNet's first call spends its time, cold and with a filled cache.

The UNet has SD1.5's structure (its blocks, attention layers and skip
connections: what dynamo traces and inductor lowers) with small channels, so
it runs on any CPU in seconds; it is compiled as the worker compiles on CUDA
(fused QKV, channels_last, 1x1 convolutions as matrix products, the batch
dimension dynamic). Run it twice with one TORCHINDUCTOR_CACHE_DIR: the first
run compiles cold, the second finds inductor's and AOTAutograd's caches
filled, as a restarted worker does. Each prints its first call's seconds and
torch.compile's own phases (worker.runners.sd.compile_phases):
`tracing_s` is dynamo reading the model's Python, which inductor's cache does
not skip. With `--precompiled` the UNet is compiled as the worker compiles it
with a compile cache (worker.precompile): the first run compiles ahead of time
and saves the whole compiled function, a second loads it.

    TORCHINDUCTOR_CACHE_DIR=/tmp/cc .venv/bin/python bench/compile_warm.py   # cold
    TORCHINDUCTOR_CACHE_DIR=/tmp/cc .venv/bin/python bench/compile_warm.py   # warm
    TORCHINDUCTOR_CACHE_DIR=/tmp/cc .venv/bin/python bench/compile_warm.py --precompiled   # twice
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

started = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch._inductor.config as inductor  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402

from worker.precompile import Precompiled, artifact_path  # noqa: E402
from worker.runners.sd import compile_phases, unet_forward  # noqa: E402

imports_s = time.perf_counter() - started


def sd15_shaped_unet() -> UNet2DConditionModel:
    """SD1.5's UNet layout (4 levels, 2 layers each, cross-attention in the top three) with small channels."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64, 64, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
    ).eval()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path)
    p.add_argument("--precompiled", action="store_true",
                   help="compile as the worker does with a compile cache: ahead of time, kept whole on disk")
    args = p.parse_args()
    unet = sd15_shaped_unet()
    unet.fuse_qkv_projections()
    unet.to(memory_format=torch.channels_last)
    inductor.conv_1x1_as_mm = True
    precompiled = None
    if args.precompiled:
        cache = Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or p.error("--precompiled needs TORCHINDUCTOR_CACHE_DIR"))
        precompiled = Precompiled("unet", unet_forward, unet, artifact_path(cache, "unet", unet_forward, unet))

    def call(batch: int) -> float:
        """One call at `batch` rows, its inputs made as the engine makes them (inference
        tensors, the batch dimension marked dynamic on every call); seconds it took."""
        with torch.inference_mode():
            x = torch.randn(batch, 4, 8, 8).contiguous(memory_format=torch.channels_last)
            t = torch.full((batch,), 10.0)
            embeds = torch.randn(batch, 7, 32)
            t0 = time.perf_counter()
            if precompiled is not None:
                precompiled(x, t, embeds)  # it marks the batch dimension itself where it compiles
            else:
                for tensor in (x, t, embeds):
                    torch._dynamo.maybe_mark_dynamic(tensor, 0)
                compiled(x, t, encoder_hidden_states=embeds, return_dict=False)
            return time.perf_counter() - t0

    compiled = torch.compile(unet)

    first_s = call(2)
    phases = compile_phases()  # the first call's alone
    other_bucket_s = call(4)
    result = {"cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR"), "torch": torch.__version__,
              "imports_s": round(imports_s, 2), "first_call_s": round(first_s, 2),
              "batch_4_after_s": round(other_bucket_s, 3), "phases": phases}
    if precompiled is not None:
        result["precompiled"] = {"source": precompiled.source, "seconds": round(precompiled.seconds, 2)}
        print(f"precompiled: {precompiled.source} ({precompiled.seconds:.1f} s)")
    print(f"imports {imports_s:.1f} s; first call (compile) {first_s:.1f} s; batch 4 after it {other_bucket_s:.3f} s"
          f"{' (compiled again)' if compile_phases() != phases else ''}")
    print("torch.compile phases:", ", ".join(f"{k} {v:.1f}" for k, v in phases.items()))
    if "tracing_s" in phases:
        print(f"dynamo tracing: {phases['tracing_s'] / first_s:.0%} of the first call")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
