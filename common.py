"""What train.py, probe.py, visualize.py and experiments/bench.py share besides the data: checked
command-line types with one-line errors, and the distributed set-up and tear-down.
"""
import argparse
import math
import os

import torch
import torch.distributed as dist


def number(kind, low, high=math.inf, open_low=False, open_high=False):
    """An argparse type: a finite int or float (kind) in [low, high], an end left out when open;
    anything else is refused with one line naming the flag (argparse adds it), the value and the
    allowed range."""
    what = "an integer" if kind is int else "a number"
    allowed = (f"{what} {'>' if open_low else '>='} {low}" if high == math.inf else
               f"{what} in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}")

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        inside = (math.isfinite(value) and (value > low if open_low else value >= low)
                  and (value < high if open_high else value <= high))
        if not inside:
            raise argparse.ArgumentTypeError(f"{text} is not allowed: it must be {allowed}")
        return value
    return parse


COUNT, NATURAL = number(int, 1), number(int, 0)             # >= 1; >= 0
POSITIVE, NONNEGATIVE = number(float, 0, open_low=True), number(float, 0)
FRACTION = number(float, 0, 1, open_low=True)               # (0, 1]


def one_line_errors(parser):
    """Argparse errors as one line on stderr (exit 2), without the usage block."""
    def error(message):
        parser.exit(2, f"error: {message} (see {parser.prog} --help)\n")
    parser.error = error
    return parser


def setup_distributed(device_arg="auto"):
    """Returns (rank, world_size, device). NCCL on GPUs, Gloo on CPU; plain python needs nothing."""
    if device_arg == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no GPU: use --device cpu")
    use_cuda = torch.cuda.is_available() if device_arg == "auto" else device_arg == "cuda"
    if use_cuda:                                # fp32 matmuls (--amp none) in TF32 on GPUs
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", 0))
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if use_cuda else "gloo")
        device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
        return rank, world, device
    return 0, 1, torch.device("cuda" if use_cuda else "cpu")


def end_distributed(device):
    """destroy_process_group, with the Gloo backend freed last, through its own binding (whose
    destructor releases the GIL). torch 2.4.1 freed it inside destroy_process_group while holding
    the GIL, and a Gloo thread that still needed the GIL to free the last collective's tensor
    deadlocked it: 2 of 60 two-process runs never exited. Whatever else holds the process group
    (DDP) must be gone before this is called."""
    backend = dist.group.WORLD._get_backend(device) if device.type == "cpu" else None
    dist.destroy_process_group()
    del backend
