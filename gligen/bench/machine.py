"""What the machine is, for result rows: processor, the instruction-set features that decide speed, native bf16.

Machines of one kind differ underneath (some x86 processors have AVX-512 with native bf16, some only AVX2, where
bf16 matmuls are emulated and slow), so every timing names its processor class, and a bf16 "peak" is only a peak
where the hardware computes bf16 natively. Knows nothing of the rest of the package.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

# /proc/cpuinfo flags that change how fast (and how) torch runs fp32 and bf16 on x86
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# oneDNN ISA caps below the bf16 instructions (ONEDNN_MAX_CPU_ISA / DNNL_MAX_CPU_ISA, as oneDNN spells them)
_BELOW_BF16_ISAS = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


def cpu_flags(cpuinfo: str | None = None) -> list[str]:
    """The flags of ISA_FLAGS this processor reports (empty where /proc/cpuinfo is unreadable)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return []
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            present = set(line.split(":", 1)[1].split())
            return [flag for flag in ISA_FLAGS if flag in present]
    return []


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def torch_cpu_capability() -> str:
    """The vector ISA torch's own CPU kernels dispatch to ("AVX512", "AVX2", ...; ATEN_CPU_CAPABILITY caps it)."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # torch < 2.1
        return "unknown"


def native_bf16(device: str | torch.device = "cpu", flags: list[str] | None = None,
                capability: str | None = None, environ: dict | None = None) -> bool:
    """True where bf16 matmuls run on bf16 hardware: a CUDA device that supports it, or a CPU with AVX512-BF16 or
    AMX-BF16 that torch and oneDNN are allowed to use. Elsewhere bf16 is emulated (converted to fp32 and back),
    and a "bf16 peak" measured there is no hardware limit."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # older torch without the argument
            return bool(torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    flags = cpu_flags() if flags is None else flags
    capability = torch_cpu_capability() if capability is None else capability
    environ = os.environ if environ is None else environ
    isa_cap = (environ.get("ONEDNN_MAX_CPU_ISA") or environ.get("DNNL_MAX_CPU_ISA") or "").upper()
    return (any(f in flags for f in NATIVE_BF16_FLAGS) and capability.upper().startswith("AVX512")
            and isa_cap not in _BELOW_BF16_ISAS)


def processor_class(flags: list[str] | None = None, capability: str | None = None,
                    environ: dict | None = None) -> str:
    """A short label for timings: "avx512+bf16", "avx512", "avx2" or "other" (what torch may use, not only what the
    processor has: ATEN_CPU_CAPABILITY=avx2 on an AVX-512 processor gives "avx2")."""
    flags = cpu_flags() if flags is None else flags
    capability = (torch_cpu_capability() if capability is None else capability).upper()
    if "avx512f" in flags and capability.startswith("AVX512"):
        return "avx512+bf16" if native_bf16("cpu", flags, capability, environ) else "avx512"
    if "avx2" in flags and capability in ("AVX2", "AVX512", "AVX512_BF16"):
        return "avx2"
    return "other"


def machine_columns(device: str | torch.device = "cpu") -> dict:
    """Columns that every benchmark / timing row carries: machine, processor class, ISA flags, torch's kernel
    capability, native bf16, threads."""
    device = torch.device(device)
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    else:
        machine = f"{cpu_name()}, {os.cpu_count()} cores"
    flags, capability = cpu_flags(), torch_cpu_capability()  # /proc/cpuinfo read once per row
    bf16 = native_bf16(device, flags, capability)
    return {"machine": machine, "processor_class": processor_class(flags, capability), "cpu_flags": " ".join(flags),
            "torch_cpu_capability": capability, "native_bf16": bf16, "threads": torch.get_num_threads()}
