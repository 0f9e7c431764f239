"""How long a preempted SD-1.x GLIGEN job needs to save: writes a checkpoint of exactly the size `GLIGENModule`
writes on SD-1.x (the trainable grounding layers of an SD-1.x-shaped UNet + AdamW's two moments) the way training
does (`AtomicCheckpointIO`: temp file, fsync, rename, previous version kept), and reads it back, timed.

The Slurm signal lead time (`#SBATCH --signal=USR1@<s>` in slurm/train.sh) must cover: finishing the current step,
this save, `scontrol requeue`, with margin for a slower shared file system.

    python experiments/bench_checkpoint.py [--dir runs/bench_checkpoint] [--repeats 3]
        -> results/bench/checkpoint_save.csv (one row per repeat; machine columns name the processor class)

Settings: BenchCheckpointConfig (gligen/experiments/config.py).
"""

import os
import shutil
import sys
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from gligen.bench.machine import machine_columns
from gligen.evaluation.results import write_csv
from gligen.experiments.config import BenchCheckpointConfig, parse
from gligen.nn.grounded_unet import add_grounding
from gligen.provenance import git_commit
from gligen.training.checkpointing import AtomicCheckpointIO


def sd15_unet() -> UNet2DConditionModel:
    """Stable Diffusion 1.x's UNet config (random weights: only sizes matter here)."""
    return UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8,
    )


def gligen_checkpoint(unet: UNet2DConditionModel) -> dict:
    """What Lightning saves for GLIGENModule: trainable weights + AdamW state (exp_avg, exp_avg_sq per weight)."""
    named = [(f"ldm.unet.{n}", p) for n, p in unet.named_parameters() if p.requires_grad]
    state = {i: {"step": torch.tensor(1.0), "exp_avg": torch.randn_like(p), "exp_avg_sq": torch.rand_like(p)}
             for i, (_, p) in enumerate(named)}
    return {"state_dict": {n: p.detach().clone() for n, p in named}, "global_step": 1,
            "optimizer_states": [{"state": state, "param_groups": [{"params": list(state), "lr": 5e-5}]}]}


def main(argv=None) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    args = parse(BenchCheckpointConfig, argv, name="bench_checkpoint", description=__doc__)
    torch.manual_seed(0)
    unet = add_grounding(sd15_unet())
    checkpoint = gligen_checkpoint(unet)
    trainable = sum(v.numel() for v in checkpoint["state_dict"].values())
    del unet
    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "last.ckpt"
    io = AtomicCheckpointIO(keep=2)
    rows, machine = [], machine_columns("cpu")
    for repeat in range(args.repeats):
        start = time.perf_counter()
        io.save_checkpoint(checkpoint, path)
        save_s = time.perf_counter() - start
        start = time.perf_counter()
        io.load_checkpoint(path, map_location="cpu")
        load_s = time.perf_counter() - start
        rows.append({"repeat": repeat, "trainable_params": trainable, "file_bytes": path.stat().st_size,
                     "save_s": round(save_s, 3), "load_s": round(load_s, 3), "dir": str(directory),
                     "git_commit": git_commit(),
                     "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
                     **machine})
        print(f"repeat {repeat}: {path.stat().st_size / 2**30:.2f} GiB, save {save_s:.1f} s, load {load_s:.1f} s",
              flush=True)
    shutil.rmtree(directory) if directory.name == "bench_checkpoint" else None
    write_csv(rows, args.out)
    print(f"{trainable / 1e6:.0f} M trainable parameters; wrote {args.out}")
