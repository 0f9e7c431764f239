"""Training-step benchmark helpers: this project's step vs an official-style step, FLOPs, matmul peak, memory.

One file on purpose: the two training-step variants it compares, and their measurement, sit side by side.

Two variants of one GLIGEN training step (same module, same batch, same optimizer over the grounding weights only):

- "ours": precomputed VAE posterior (`latent_mean` / `latent_std`), `caption_embeds` and `phrase_embeds`, so no
  frozen encoder runs; frozen UNet weights have requires_grad=False, so backward computes no weight gradients for
  them (activation gradients still flow through the whole UNet down to the first fuser).
- "official": what the official trainer computes every step: VAE encode of `pixel_values`, CLIP text encoder on
  captions and phrases (both without grad, as there), and gradients for ALL UNet weights (requires_grad=True on
  the frozen UNet parameters; the optimizer still only updates the grounding weights), fp32.

Both run with caption / grounding dropout off so their compute is identical apart from the differences above. The
limit is the step's FLOPs (torch.utils.flop_counter.FlopCounterMode: matmuls, convolutions, attention, forward and
backward) divided by the dense fp32 matmul throughput measured here (a large `torch.mm`, best of several); model FLOP
utilisation (MFU) = limit / measured step time. The peak is the best of several timings taken before and between the
timed steps (a busy moment only lowers a timing, so the best is the closest to the hardware). TF32 is switched off on
GPU so everything is fp32.

Memory: on GPU `torch.cuda.max_memory_allocated` around the step (weights + gradients + optimizer state +
activations). On CPU each variant runs in a fresh subprocess (`python -m gligen.bench.train_step ...`) that loads the
model and the saved batch, resets the kernel's peak-RSS counter (`/proc/self/clear_refs` = 5, Linux >= 4.0) and reads
`VmHWM` after the steps, so loading transients do not count; where the reset is unavailable it falls back to
`resource.getrusage(RUSAGE_SELF).ru_maxrss` (then loading counts too). Both numbers are whole-process peaks (weights
included); `*_step_mb` is the part above the resident size just before the first step (an overstatement where weights
are memory-mapped safetensors not yet touched by then: use the whole-process peak).
"""

from __future__ import annotations

import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from gligen.bench.machine import machine_columns, native_bf16
from gligen.module import GLIGENModule
from gligen.toy.pipeline import TinyPipelineConfig, build_tiny_pipeline
from gligen.toy.pretrain import PretrainConfig
from gligen.toy.shipped import shipped_ldm

VARIANTS = ("ours", "official")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


@dataclass
class StepOptions:
    """How "ours" runs (the official-style step is always fp32, eager, channels-first, as the official trainer).

    precision: "fp32", or "bf16" = torch.autocast to bfloat16 (Lightning's "bf16-mixed": fp32 weights and optimizer,
        bf16 matmuls / convolutions); MFU is then measured against the bf16 matmul peak where the device computes
        bf16 natively (gligen.bench.machine.native_bf16), and not at all where bf16 is emulated (AVX2-only CPUs).
    channels_last: UNet weights and latents in channels-last memory format (GLIGENModule(channels_last=True)).
    compile: torch.compile of the UNet (GLIGENModule(compile_unet=True)); compilation happens in an untimed step.
    half_frozen: the frozen weights (UNet, VAE, text encoder) in the half dtype of `precision`
        (GLIGENModule(half_frozen=True)); the memory comparison then also measures ours with fp32 frozen weights.
    """

    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    half_frozen: bool = False

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}")
        if self.half_frozen and PRECISIONS[self.precision] is None:
            raise ValueError("half_frozen needs a half precision (bf16): fp32 frozen weights are the fp32 step")

    @property
    def label(self) -> str:
        return "+".join([self.precision] + ["channels_last"] * self.channels_last + ["compile"] * self.compile
                        + ["half_frozen"] * self.half_frozen)


@dataclass
class BenchSize:
    name: str
    pipeline: TinyPipelineConfig
    batch_size: int
    num_objects: int = 30  # official max_objects
    objects_per_sample: int = 3
    note: str = ""
    pretrained: str | None = None  # an LDM directory to measure (its real weights) instead of building `pipeline`'s
    extra: dict = field(default_factory=dict)

    @property
    def latent_size(self) -> int:
        return self.pipeline.image_size // 2 ** (len(self.pipeline.vae_channels) - 1)


def toy_size() -> BenchSize:
    """The toy world's LDM, the one its GLIGEN models train on: the shipped toy LDM (gligen/toy/shipped/ldm, what
    `python -m gligen.toy build` copies or pretrains: 32 px -> 8x8x4 latents) at the toy configs' batch 64. Without
    the shipped files, a random LDM of the same shape (gligen/toy/pretrain.py's PretrainConfig)."""
    c = PretrainConfig()
    pipeline = TinyPipelineConfig(
        image_size=32, vae_channels=c.vae_channels, unet_channels=c.unet_channels,
        unet_down_blocks=c.unet_down_blocks, unet_up_blocks=c.unet_up_blocks, unet_layers_per_block=1,
        attention_heads=c.attention_heads, text_width=c.text_width, text_layers=c.text_layers, text_heads=4,
        norm_num_groups=16,
    )
    ldm = shipped_ldm()
    if (ldm / "model_index.json").exists():
        return BenchSize("toy", pipeline, batch_size=c.batch_size, pretrained=str(ldm),
                         note="the shipped toy LDM (gligen/toy/shipped/ldm), the base every toy GLIGEN trains on")
    return BenchSize("toy", pipeline, batch_size=c.batch_size, note="random LDM of the toy LDM's shape")


def sd_size(image_size: int = 128, batch_size: int = 1) -> BenchSize:
    """SD-1.x-shaped pipeline at reduced resolution. UNet exactly SD-1.x's (320, 640, 1280, 1280), 2 layers per
    block, 8 heads, cross-attention 768, SD block types). Stand-ins: text encoder = CLIP ViT-L/14 text tower shape
    (width 768, 12 layers, 12 heads) with a tiny vocabulary; VAE = SD's channels (128, 256, 512, 512) and 4
    latent channels but 1 ResNet layer per block (SD: 2), mid-block attention as SD."""
    pipeline = TinyPipelineConfig(
        image_size=image_size, vae_channels=(128, 256, 512, 512), unet_channels=(320, 640, 1280, 1280),
        unet_down_blocks=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        unet_up_blocks=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, unet_layers_per_block=2,
        attention_heads=8, text_width=768, text_layers=12, text_heads=12, norm_num_groups=32,
    )
    return BenchSize("sd", pipeline, batch_size=batch_size,
                     note="SD-1.x UNet; CLIP-L-shaped text tower; SD-channel VAE with 1 layer/block")


def tiny_size() -> BenchSize:
    """Test-sized (TinyPipelineConfig defaults, 16 px -> 8x8 latents, batch 2)."""
    return BenchSize("tiny", TinyPipelineConfig(), batch_size=2)


SIZES = {"toy": toy_size, "sd": sd_size, "tiny": tiny_size}


# ----- model, batch, step ---------------------------------------------------------------------------------------
def make_module(pretrained: str, device: str = "cpu"):
    module = GLIGENModule(pretrained, caption_dropout=0.0, grounding_dropout=0.0, warmup_steps=0)
    module.to(device).train()
    module.grounding_names = {n for n, _ in module.trainable_named_parameters()}
    module.grounding_params = [p for _, p in module.trainable_named_parameters()]  # by identity: compile renames
    # plain attributes, not submodules: the state dict and parameter names stay the module's own
    object.__setattr__(module, "eager_unet", module.ldm.unet)
    object.__setattr__(module, "compiled_unet", None)
    return module


def make_optimizer(module) -> torch.optim.Optimizer:
    """The training optimizer (AdamW over fusers + position_net), as configure_optimizers builds it."""
    return module.configure_optimizers()["optimizer"]


def make_batch(module, size: BenchSize, seed: int = 0) -> dict:
    """A box batch with both the raw inputs (pixels, captions, phrases) and their precomputed features, made
    with the module's own frozen encoders (as `gligen.data precompute` does)."""
    g = torch.Generator().manual_seed(seed)
    b, n, k = size.batch_size, size.num_objects, size.objects_per_sample
    words = size.pipeline.words
    boxes, masks = torch.zeros(b, n, 4), torch.zeros(b, n)
    phrases = [[""] * n for _ in range(b)]
    for i in range(b):
        for j in range(k):
            xy = torch.rand(2, generator=g) * 0.5
            boxes[i, j] = torch.cat([xy, xy + torch.rand(2, generator=g) * 0.4 + 0.1])
            masks[i, j] = 1
            phrases[i][j] = f"{words[(i + j) % len(words)]} {words[(i + 2 * j + 1) % len(words)]}"
    captions = [" ".join(words[(i + m) % len(words)] for m in range(8)) for i in range(b)]
    pixels = torch.rand(b, 3, size.pipeline.image_size, size.pipeline.image_size, generator=g) * 2 - 1
    device = module.device
    with torch.no_grad():
        posterior = module.ldm.vae.encode(pixels.to(device)).latent_dist
        caption_embeds = module.ldm.encode_captions(captions)
        phrase_embeds = module.ldm.encode_phrases(phrases)
    return {"pixel_values": pixels.to(device), "captions": captions, "phrases": phrases,
            "boxes": boxes.to(device), "masks": masks.to(device),
            "latent_mean": posterior.mean, "latent_std": posterior.std,
            "caption_embeds": caption_embeds, "phrase_embeds": phrase_embeds}


def variant_batch(batch: dict, variant: str) -> dict:
    raw = ("pixel_values", "captions")
    pre = ("latent_mean", "latent_std", "caption_embeds", "phrase_embeds")
    drop = raw if variant == "ours" else pre
    return {k: v for k, v in batch.items() if k not in drop}


def set_variant(module, variant: str, options: StepOptions | None = None) -> None:
    """ours: only grounding weights require grad, UNet as `options` say; official: every UNet weight requires grad
    (encoders stay frozen), eager, channels-first."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    options = options if variant == "ours" and options is not None else StepOptions()
    unet = module.eager_unet
    unet.to(memory_format=torch.channels_last if options.channels_last else torch.contiguous_format)
    module.hparams.channels_last = options.channels_last  # diffusion_loss converts the latents to match
    if options.compile and module.compiled_unet is None:
        object.__setattr__(module, "compiled_unet", torch.compile(unet))
    module.ldm.unet = module.compiled_unet if options.compile else unet
    unet.requires_grad_(variant == "official")
    for p in module.grounding_params:
        p.requires_grad_(True)
    # frozen weights in half precision for ours with half_frozen, back to fp32 otherwise (the official step trains
    # every UNet weight in fp32; the round trip changes the weights' values, not the cost being measured)
    frozen = PRECISIONS[options.precision] if options.half_frozen else torch.float32
    grounding = {id(p) for p in module.grounding_params}
    for p in module.parameters():
        if id(p) not in grounding and p.dtype != frozen:
            p.data = p.data.to(frozen)


def train_step(module, batch: dict, optimizer: torch.optim.Optimizer, precision: str = "fp32") -> float:
    """One optimisation step: GLIGENModule.diffusion_loss (under bf16 autocast if asked), backward, AdamW step,
    gradients freed."""
    no_drop = torch.zeros(len(batch["boxes"]), dtype=torch.bool, device=module.device)
    dtype = PRECISIONS[precision]
    with torch.autocast(module.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = module.diffusion_loss(batch, no_drop, no_drop)
    loss.backward()
    optimizer.step()
    module.zero_grad(set_to_none=True)  # also frees the official variant's UNet weight gradients
    return float(loss.detach())


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(module, batch, optimizer, precision: str = "fp32") -> float:
    _sync(module.device)
    start = time.perf_counter()
    train_step(module, batch, optimizer, precision)
    _sync(module.device)
    return time.perf_counter() - start


def count_flops(module, batch: dict, optimizer, precision: str = "fp32") -> int:
    """FLOPs of one training step (forward + backward; FlopCounterMode counts matmul / conv / attention ops).
    Count in eager mode: the FLOPs are the math's, whatever runs them."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        train_step(module, batch, optimizer, precision)
    return int(counter.get_total_flops())


def matmul_peak_flops(device="cpu", n: int | None = None, repeats: int = 5, precision: str = "fp32") -> float:
    """Dense matmul throughput (FLOP/s) in `precision`: best of `repeats` timings of an n x n `torch.mm`, best over
    n in (1024, 2048) on CPU (which size runs fastest depends on the cache and thread count) and n = 8192 on GPU."""
    device = torch.device(device)
    sizes = [n] if n else ([8192] if device.type == "cuda" else [1024, 2048])
    dtype = PRECISIONS[precision] or torch.float32
    best_flops = 0.0
    for size in sizes:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        torch.mm(a, b)
        best = float("inf")
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            torch.mm(a, b)
            _sync(device)
            best = min(best, time.perf_counter() - start)
        best_flops = max(best_flops, 2 * size**3 / best)
    return best_flops


# ----- memory ---------------------------------------------------------------------------------------------------
def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_kb(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def memory_worker(pretrained: str, batch_path: str, variant: str, steps: int = 2,
                  options: StepOptions | None = None) -> dict:
    """Run in a fresh process: load model + batch, `steps` training steps of `variant`; peak RSS in MB."""
    torch.manual_seed(0)
    options = options or StepOptions()
    module = make_module(pretrained)
    batch = variant_batch(torch.load(batch_path, weights_only=True), variant)
    set_variant(module, variant, options)
    precision = options.precision if variant == "ours" else "fp32"
    optimizer = make_optimizer(module)
    gc.collect()
    before_kb = _status_kb("VmRSS")
    reset = _reset_peak_rss()
    for _ in range(steps):
        train_step(module, batch, optimizer, precision)
    peak_kb = _status_kb("VmHWM") if reset else None
    method = "VmHWM after clear_refs"
    if peak_kb is None:
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux
        method = "ru_maxrss"
    return {"peak_mb": peak_kb / 1024, "step_mb": (peak_kb - (before_kb or 0)) / 1024, "method": method}


def cpu_memory(pretrained: str, batch_path: str, variant: str, steps: int = 2,
               options: StepOptions | None = None) -> dict:
    cmd = [sys.executable, "-m", "gligen.bench.train_step", "memory", pretrained, batch_path, variant, str(steps),
           json.dumps(asdict(options or StepOptions()))]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    return json.loads(out.stdout.strip().splitlines()[-1])


def gpu_memory(module, batch: dict, optimizer, variant: str, options: StepOptions | None = None) -> dict:
    set_variant(module, variant, options)
    precision = options.precision if options is not None and variant == "ours" else "fp32"
    vb = variant_batch(batch, variant)
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(module.device)
    torch.cuda.reset_peak_memory_stats(module.device)
    train_step(module, vb, optimizer, precision)
    peak = torch.cuda.max_memory_allocated(module.device)
    return {"peak_mb": peak / 2**20, "step_mb": (peak - before) / 2**20, "method": "cuda.max_memory_allocated"}


# ----- the whole comparison -------------------------------------------------------------------------------------
def bench_size(size: BenchSize, repeats: int = 3, device: str = "cpu", workdir: str | None = None,
               memory: bool = True, options: StepOptions | None = None, peak_size: int | None = None,
               log=print, memory_official: bool = True) -> dict:
    """Time (median of `repeats` alternating ours/official steps after one warm-up each), count FLOPs, measure
    the matmul peak and peak memory of both variants on one model and batch. Returns one result row.
    `options` say how "ours" runs (precision, channels-last, compile); the official-style step is always fp32.
    `peak_size`: side of the peak's matmul (default: best of 1024 and 2048 on CPU). A bf16 "ours" on a device
    without native bf16 gets no bf16 peak, limit or MFU (empty cells): an emulated peak is no hardware limit.
    `memory_official=False`: no memory measurement of the official-style step (18 GB at SD size on CPU)."""
    options = options or StepOptions()
    native = native_bf16(device)
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    precision = {"ours": options.precision, "official": "fp32"}
    with tempfile.TemporaryDirectory(prefix=f"bench_{size.name}_", dir=workdir) as tmp:
        t0 = time.perf_counter()
        pretrained = size.pretrained or str(build_tiny_pipeline(Path(tmp) / "ldm", size.pipeline, seed=0))
        torch.manual_seed(0)
        module = make_module(pretrained, device)
        batch = make_batch(module, size)
        optimizer = make_optimizer(module)
        n_unet = sum(p.numel() for n, p in module.ldm.unet.named_parameters() if n not in _prefixed(module))
        n_ground = sum(p.numel() for n, p in module.named_parameters() if n in module.grounding_names)
        log(f"[{size.name}] built in {time.perf_counter() - t0:.0f} s: frozen UNet {n_unet / 1e6:.1f} M, "
            f"grounding {n_ground / 1e6:.1f} M params, batch {size.batch_size}, latents {size.latent_size}^2, "
            f"ours = {options.label}")
        flops, times = {}, {v: [] for v in VARIANTS}
        for variant in VARIANTS:  # warm-up + FLOP count (one untimed eager step each)
            set_variant(module, variant, replace(options, compile=False) if variant == "ours" else None)
            flops[variant] = count_flops(module, variant_batch(batch, variant), optimizer, precision[variant])
        if options.compile:  # compilation (and its recompilation for the second call) outside the timings
            set_variant(module, "ours", options)
            for _ in range(2):
                train_step(module, variant_batch(batch, "ours"), optimizer, options.precision)
        # the matmul peak is re-measured between the repeats and the best is kept: on a shared machine a single
        # measurement can land in a busy moment and understate the peak (MFU > 1)
        measured = {p for p in precision.values() if p == "fp32" or native}
        peak = {p: matmul_peak_flops(device, n=peak_size, precision=p) for p in measured}
        for r in range(repeats):
            for variant in VARIANTS:  # alternating: ours, official, ours, official, ...
                set_variant(module, variant, options)
                times[variant].append(timed_step(module, variant_batch(batch, variant), optimizer,
                                                 precision[variant]))
            peak = {p: max(f, matmul_peak_flops(device, n=peak_size, repeats=2, precision=p))
                    for p, f in peak.items()}
            log(f"[{size.name}] repeat {r + 1}/{repeats}: ours {times['ours'][-1]:.3f} s, "
                f"official {times['official'][-1]:.3f} s, matmul peak so far "
                + ", ".join(f"{p} {f / 1e9:.1f}" for p, f in peak.items()) + " GFLOP/s")
        mem = {}
        if memory:  # with half_frozen also ours with fp32 frozen weights: the saving, side by side, same step
            measured_mem = [(v, v, options) for v in VARIANTS if memory_official or v == "ours"] + (
                [("ours_fp32_frozen", "ours", replace(options, half_frozen=False))] if options.half_frozen else [])
            if torch.device(device).type == "cuda":
                mem = {name: gpu_memory(module, batch, optimizer, v, o) for name, v, o in measured_mem}
            else:
                batch_path = str(Path(tmp) / "batch.pt")
                torch.save({k: v.cpu() if torch.is_tensor(v) else v for k, v in batch.items()}, batch_path)
                del module, optimizer, batch
                gc.collect()
                mem = {name: cpu_memory(pretrained, batch_path, v, options=o) for name, v, o in measured_mem}
    med = {v: statistics.median(times[v]) for v in VARIANTS}
    row = {
        "size": size.name, "batch_size": size.batch_size, "image_size": size.pipeline.image_size,
        "latent_size": size.latent_size, "unet_channels": "/".join(map(str, size.pipeline.unet_channels)),
        "frozen_unet_params_m": round(n_unet / 1e6, 2), "grounding_params_m": round(n_ground / 1e6, 2),
        "repeats": repeats,
        "time_ours_s": med["ours"], "time_official_s": med["official"],
        "time_ratio_ours_over_official": med["ours"] / med["official"],
        "times_ours": " ".join(f"{t:.4f}" for t in times["ours"]),
        "times_official": " ".join(f"{t:.4f}" for t in times["official"]),
        "ours_options": options.label, "precision_ours": options.precision,
        "channels_last_ours": options.channels_last, "compile_ours": options.compile,
        "half_frozen_ours": options.half_frozen,
        "flops_ours": flops["ours"], "flops_official": flops["official"],
        "matmul_peak_flops": peak["fp32"], "matmul_peak_flops_ours": peak.get(options.precision),
        "limit_ours_s": flops["ours"] / peak[options.precision] if options.precision in peak else None,
        "limit_official_s": flops["official"] / peak["fp32"],
        "mfu_ours": flops["ours"] / peak[options.precision] / med["ours"] if options.precision in peak else None,
        "mfu_ours_vs_fp32_peak": flops["ours"] / peak["fp32"] / med["ours"],
        "mfu_official": flops["official"] / peak["fp32"] / med["official"],
    }
    if mem:
        row.update({"mem_ours_mb": mem["ours"]["peak_mb"], "mem_step_ours_mb": mem["ours"]["step_mb"],
                    "mem_method": mem["ours"]["method"]})
    if "official" in mem:
        row.update({
            "mem_official_mb": mem["official"]["peak_mb"],
            "mem_ratio_ours_over_official": mem["ours"]["peak_mb"] / mem["official"]["peak_mb"],
            "mem_step_official_mb": mem["official"]["step_mb"],
        })
    if "ours_fp32_frozen" in mem:
        row.update({"mem_ours_fp32_frozen_mb": mem["ours_fp32_frozen"]["peak_mb"],
                    "mem_ratio_half_over_fp32_frozen": mem["ours"]["peak_mb"] / mem["ours_fp32_frozen"]["peak_mb"]})
    row.update({"device": str(device), **machine_columns(device), "torch": torch.__version__, "note": size.note})
    return row


def _prefixed(module) -> set[str]:
    """UNet parameter names (relative to the UNet) that are grounding weights."""
    return {n[len("ldm.unet."):] for n in module.grounding_names if n.startswith("ldm.unet.")}


def summary(row: dict) -> str:
    name = row["size"]
    precision = row.get("precision_ours", "fp32")
    lines = [
        (f"[{name}] ours = {row.get('ours_options', 'fp32')}; step time ours {row['time_ours_s']:.3f} s, "
         f"official-style {row['time_official_s']:.3f} s (median of {row['repeats']}); "
         f"a/b time ratio {row['time_ratio_ours_over_official']:.3f}"),
        (f"[{name}] FLOPs ours {row['flops_ours'] / 1e9:.2f} G, official {row['flops_official'] / 1e9:.2f} G; "
         f"matmul peak fp32 {row['matmul_peak_flops'] / 1e9:.1f} GFLOP/s"
         + (f", {precision} {row['matmul_peak_flops_ours'] / 1e9:.1f} GFLOP/s"
            if precision != "fp32" and row["mfu_ours"] is not None else "")
         + (f"; limit ours {row['limit_ours_s']:.3f} s; MFU ours {row['mfu_ours']:.3f} (of the {precision} peak)"
            if row["mfu_ours"] is not None else
            f"; {precision} is emulated on this {row.get('processor_class', '')} device: no {precision} peak or MFU; "
            f"ours at {row['mfu_ours_vs_fp32_peak']:.3f} of the fp32 peak")
         + f", MFU official {row['mfu_official']:.3f}"),
    ]
    if "mem_official_mb" in row:
        lines.append(f"[{row['size']}] peak memory ours {row['mem_ours_mb']:.0f} MB, official "
                     f"{row['mem_official_mb']:.0f} MB; a/b memory ratio {row['mem_ratio_ours_over_official']:.3f} "
                     f"(above pre-step resident: {row['mem_step_ours_mb']:.0f} / {row['mem_step_official_mb']:.0f}"
                     f" MB; {row['mem_method']})")
    if "mem_ours_fp32_frozen_mb" in row:
        lines.append(f"[{row['size']}] peak memory ours with half-precision frozen weights "
                     f"{row['mem_ours_mb']:.0f} MB, with fp32 frozen weights {row['mem_ours_fp32_frozen_mb']:.0f} MB "
                     f"(same step): half / fp32 frozen {row['mem_ratio_half_over_fp32_frozen']:.3f}")
    return "\n".join(lines)


if __name__ == "__main__":  # memory worker: python -m gligen.bench.train_step memory PRETRAINED BATCH VARIANT [STEPS]
    if len(sys.argv) >= 5 and sys.argv[1] == "memory":
        options = StepOptions(**json.loads(sys.argv[6])) if len(sys.argv) > 6 else None
        print(json.dumps(memory_worker(sys.argv[2], sys.argv[3], sys.argv[4],
                                       int(sys.argv[5]) if len(sys.argv) > 5 else 2, options)))
    else:
        sys.exit("usage: python -m gligen.bench.train_step memory PRETRAINED BATCH_PT VARIANT [STEPS [OPTIONS_JSON]]")
