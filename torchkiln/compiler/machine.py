"""What this machine's CPU is and can do: its model name and its instruction-set flags.

Read from ``/proc/cpuinfo`` (Linux); elsewhere the flags are unknown (``None``), and callers that
would refuse an artifact on a missing flag say they could not check instead.
"""

from __future__ import annotations

import functools
import platform

#: the instruction-set flags that decide which kernels are fast (int8: VNNI / AMX; bf16: AMX / avx512_bf16)
KERNEL_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")


@functools.cache
def _cpuinfo() -> tuple[str, frozenset[str] | None]:
    model, flags = platform.processor() or "unknown", None
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model in ("unknown", platform.processor()):
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = frozenset(value.split())
                    break
    except OSError:
        pass
    return model, flags


def cpu_model() -> str:
    return _cpuinfo()[0]


def cpu_flags() -> frozenset[str] | None:
    """The CPU's flags as ``/proc/cpuinfo`` spells them (``avx512_vnni``), or None if unknown."""
    return _cpuinfo()[1]


def flag_of_compiler_option(option: str) -> str:
    """``-mavx512vnni`` → ``avx512_vnni``: the cpuinfo flag a gcc ``-m`` target option needs."""
    name = option.removeprefix("-m").replace("-", "_")
    renamed = {"avx512vnni": "avx512_vnni", "avx512bf16": "avx512_bf16", "avx512fp16": "avx512_fp16",
               "avxvnni": "avx_vnni", "avx512vbmi": "avx512_vbmi"}  # fmt: skip
    return renamed.get(name, name)


#: flags whose int8 dot products accumulate u8×s8 in 32 bits (no 16-bit intermediate to saturate)
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def int8_saturates() -> bool:
    """Whether this CPU's 8-bit u8×s8 kernels can saturate: x86 without VNNI or AMX.

    There ONNX Runtime and oneDNN multiply pairs with ``vpmaddubsw``, whose 16-bit sum of two
    255 × 127 products overflows; 7-bit weights (±63) keep it in range. True when the flags are
    unknown on x86 (the safe answer); False off x86 (ARM's dot products accumulate in 32 bits).
    """
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False
    flags = cpu_flags()
    return flags is None or not any(flag in flags for flag in INT8_DOT_FLAGS)
