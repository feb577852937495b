"""Where the time of one training step goes: torch.profiler over 5 steps of bench.py's step.

    python experiments/profile_step.py --batch-size 128 --amp none     # cifar preset, fp32
    python experiments/profile_step.py --baseline --amp bf16            # any train.py model flag

Prints the busiest operators, the share of the operator time spent in matrix products, and the
rate those products reach (profiled) against the large-matmul peak of the same dtype, measured
before and after as in bench.py: what the model's own matrix sizes allow on this machine.
"""
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import bench  # noqa: E402  experiments/bench.py
import train  # noqa: E402

MATMULS = ("aten::mm", "aten::addmm", "aten::bmm")


def main(steps=5):
    args = train.parse_args(prog="experiments/profile_step.py")
    device = train.setup_distributed(args.device)[2]
    args.amp = train.resolve_amp(args.amp, device)
    cfg = train.build_config(args)
    step = bench.bench_step(args, cfg, False, device)[0]
    dtype = train.AMP_DTYPES[args.amp] or torch.float32
    peak = bench.matmul_peak(device, dtype)                 # and again after: the higher counts
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, with_flops=True) as prof:
        for _ in range(steps):
            step()
        bench.synchronizer(device)()
    events = prof.key_averages()
    own = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    print(events.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                       row_limit=15, max_name_column_width=40))
    total = sum(own(e) for e in events)                                  # microseconds
    mm_time = sum(own(e) for e in events if e.key in MATMULS)
    mm_flops = sum(e.flops for e in events if e.key in MATMULS)
    peak = max(peak, bench.matmul_peak(device, dtype))
    rate = mm_flops / (mm_time / 1e6)
    print(f"{'baseline' if cfg.baseline else 'SemanticMIM'} ({args.preset} preset) batch "
          f"{args.batch_size}, --amp {args.amp}, {device} ({torch.get_num_threads()} threads), "
          f"{steps} steps: matrix products (mm/addmm/bmm) take {100 * mm_time / total:.0f}% of "
          f"the operator time and run at {rate / 1e9:.1f} GFLOP/s = {100 * rate / peak:.0f}% of "
          f"the {peak / 1e9:.1f} GFLOP/s large-matmul peak")
    print("command: python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
