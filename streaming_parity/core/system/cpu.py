"""The int8 kernel path ONNX Runtime takes on this CPU, read from the CPU's feature flags.

Dynamic int8 graphs (``onnxruntime.quantization.quantize_dynamic``) multiply u8 activations by the
weights' integer type inside MLAS. Which kernel runs depends on the CPU, as MLAS's dispatch
(``onnxruntime/core/mlas/lib/platform.cpp``) chooses it at start-up:

==================  ===========================================================================
path                u8 activations x s8 weights (QInt8)
==================  ===========================================================================
``amx``             AMX tiles (AMX-TILE + AMX-INT8): 32-bit accumulation, exact
``avx512-vnni``     ``vpdpbusd``: 32-bit accumulation, exact
``avx-vnni``        ``vpdpbusd`` (VEX-encoded, Alder Lake and later): exact
``avx512-core``     AVX512BW without VNNI: ``vpmaddubsw`` sums pairs into int16 with saturation
``avx2``            AVX2 without VNNI: ``vpmaddubsw`` sums pairs into int16 with saturation
``x86``             no AVX2: MLAS's generic (or SSE4.1) kernel, 32-bit accumulation
``arm64-dotprod``   ``udot``/``sdot``: exact
``arm64``           NEON widening multiplies: exact
==================  ===========================================================================

A pair of u8 x s8 products reaches 2 x 255 x 128 = 65,280, past int16's 32,767: on the two
saturating paths a full-range QInt8 weight can clip the sum (ONNX Runtime's quantization guide
recommends ``reduce_range`` or u8 weights there). u8 x u8 (QUInt8 weights) runs MLAS's U8U8 kernels,
which widen both operands to int16 before ``vpmaddwd``: exact on every path. So the int8 error of a
non-saturating export is the same integer arithmetic everywhere, and only the saturating kind makes
a verdict depend on the CPU.
"""

from __future__ import annotations

import functools
import platform
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field

# The paths where MLAS's u8 x s8 kernel sums pairs of products into int16 with saturation.
SATURATING_PATHS = frozenset({"avx2", "avx512-core"})
KNOWN_PATHS = ("amx", "avx512-vnni", "avx-vnni", "avx512-core", "avx2", "x86", "arm64-dotprod", "arm64", "unknown")
SYSCTL_TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True)
class Int8KernelPath:
    """The kernel ONNX Runtime's CPU provider runs for dynamic int8 ``MatMul`` on this machine."""

    name: str  # one of KNOWN_PATHS
    machine: str  # platform.machine()
    flags: tuple[str, ...] = field(default=())  # the CPU flags the choice was read from (those that matter)

    @property
    def saturates_u8s8(self) -> bool:
        """Whether u8 activations x s8 weights are summed pairwise into int16 with saturation here."""
        return self.name in SATURATING_PATHS

    def describe(self) -> str:
        kind = ("u8 x s8 saturates (vpmaddubsw, int16 pair sums)" if self.saturates_u8s8
                else "u8 x s8 and u8 x u8 exact (32-bit accumulation)" if self.name != "unknown"
                else "u8 x s8 behaviour unknown")
        return f"{self.name} ({kind})"

    def to_dict(self) -> dict:
        return {"name": self.name, "machine": self.machine, "flags": list(self.flags),
                "saturates_u8s8": self.saturates_u8s8}


def kernel_path_from_flags(machine: str, flags: Iterable[str]) -> Int8KernelPath:
    """The path MLAS's dispatch chooses for CPU ``flags`` (Linux ``/proc/cpuinfo`` spellings, lower case).

    The order follows MLAS: AVX2 first, AVX-VNNI over it, AVX512 core over that (so AVX512BW without
    AVX512-VNNI saturates again even where AVX-VNNI exists), AVX512-VNNI over AVX512 core, AMX last.
    """
    found = {f.lower() for f in flags}
    arch = machine.lower()
    if arch in ("arm64", "aarch64"):
        dot = "asimddp" in found or "dotprod" in found
        return Int8KernelPath("arm64-dotprod" if dot else "arm64", machine, tuple(sorted(found & {"asimddp", "dotprod"})))
    if arch not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return Int8KernelPath("unknown", machine, ())
    relevant = {"avx2", "avx_vnni", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni", "amx_tile", "amx_int8"}
    kept = tuple(sorted(found & relevant))
    if "avx2" not in found:
        return Int8KernelPath("x86", machine, kept)
    name = "avx-vnni" if "avx_vnni" in found else "avx2"
    if {"avx512bw", "avx512dq", "avx512vl"} <= found:
        name = "avx512-vnni" if "avx512_vnni" in found else "avx512-core"
    if {"amx_tile", "amx_int8"} <= found:
        name = "amx"
    return Int8KernelPath(name, machine, kept)


def _linux_flags() -> set[str]:
    flags: set[str] = set()
    try:
        text = open("/proc/cpuinfo", encoding="utf-8", errors="replace").read()
    except OSError:
        return flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):  # x86 / arm64 spellings
            flags.update(value.split())
    return flags


# macOS sysctl names -> the Linux flag spellings ``kernel_path_from_flags`` reads.
_DARWIN_X86 = {"avx2": "avx2", "avx512bw": "avx512bw", "avx512dq": "avx512dq", "avx512vl": "avx512vl",
               "avx512vnni": "avx512_vnni"}


def _sysctl(name: str) -> str:
    try:
        return subprocess.run(["sysctl", "-n", name], capture_output=True, text=True,
                              timeout=SYSCTL_TIMEOUT_SECONDS).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _darwin_flags(machine: str) -> set[str]:
    if machine.lower() == "arm64":
        # Every Apple silicon core has the dot-product instructions; sysctl says so explicitly.
        return {"asimddp"} if _sysctl("hw.optional.arm.FEAT_DotProd") == "1" else set()
    words = f"{_sysctl('machdep.cpu.features')} {_sysctl('machdep.cpu.leaf7_features')}".lower().split()
    return {_DARWIN_X86[w] for w in words if w in _DARWIN_X86}


@functools.cache
def int8_kernel_path() -> Int8KernelPath:
    """This machine's path (read once per process)."""
    machine = platform.machine()
    system = platform.system()
    if system == "Linux":
        return kernel_path_from_flags(machine, _linux_flags())
    if system == "Darwin":
        return kernel_path_from_flags(machine, _darwin_flags(machine))
    return Int8KernelPath("unknown", machine, ())
