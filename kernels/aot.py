"""Compile the weight kernels for a real GPU without one, and read the machine code they become.

Development tool (``benchmarks/kernel_sass.py``, ``tests/test_kernel_compile.py``); never imported
by the server. Inside :func:`compile_only`, every Triton launch that bitserve's wrappers make is
compiled for CUDA ``sm_<arch>`` -- with the same argument specialization (pointer alignment,
divisibility by 16) that a launch on that GPU would get -- and recorded instead of run. Triton
ships ``ptxas`` and ``nvdisasm``, so this works on a machine without a GPU or a CUDA install, and
:func:`sass_summary` then describes each kernel's loops: instructions, memory-load widths,
barriers, integer dot products and tensor-core instructions. This is how kernels were checked
between GPU sessions: a loop that converts layouts through shared memory shows up as ``BAR``s,
unvectorised weight loads as ``LDG.E.U8``.

Requires Triton kernels to be compiled, not interpreted: ``TRITON_INTERPRET`` must be unset when
the kernel modules are first imported.
"""

from __future__ import annotations

import collections
import contextlib
import re
from dataclasses import dataclass, field
from typing import Iterator

import torch


@dataclass
class CompiledLaunch:
    """One launch, compiled: the kernel's name, its keyword arguments (constexprs and launch
    options such as ``BLOCK_N``, ``num_warps``) and the Triton artefacts."""

    name: str
    kernel: object  # triton.compiler.CompiledKernel
    meta: dict = field(default_factory=dict)

    @property
    def num_warps(self) -> int:
        return int(self.kernel.metadata.num_warps)

    @property
    def shared_bytes(self) -> int:
        return int(self.kernel.metadata.shared)

    def sass(self) -> str:
        from triton.tools.disasm import get_sass

        return get_sass(self.kernel.asm["cubin"])

    def ptx(self) -> str:
        return self.kernel.asm["ptx"]

    def resources(self) -> dict:
        """``{"registers": per thread, "local": bytes of stack + local memory per thread (spills)}``
        from ``cuobjdump -res-usage`` on the cubin (-1 registers where it cannot tell)."""
        import os
        import subprocess
        import tempfile

        import triton

        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(self.kernel.asm["cubin"])
            f.flush()
            res = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True)
        found = {key: re.search(rf"\b{tag}:(\d+)", res.stdout)
                 for key, tag in (("registers", "REG"), ("stack", "STACK"), ("local_mem", "LOCAL"))}
        got = {key: int(m.group(1)) if m else -1 for key, m in found.items()}
        # register spills live in the stack frame (STACK); LOCAL is local memory declared as such
        return {"registers": got["registers"], "local": max(got["stack"], 0) + max(got["local_mem"], 0)}


class _CompileOnlyDriver:
    """The bits of Triton's driver interface that compiling (not launching) uses."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


@contextlib.contextmanager
def compile_only(arch: int = 90) -> Iterator[list[CompiledLaunch]]:
    """Within the block, Triton launches compile for ``sm_<arch>`` and are recorded, not run.

    Call the kernel wrappers with CPU tensors of the shapes of interest; the yielded list fills
    with one :class:`CompiledLaunch` per launch. Outputs are left unwritten. One target per process:
    Triton's in-process kernel cache does not key on the target (a second arch raises).
    """
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    from bitserve.kernels.tl_common import interpreting

    if interpreting():
        raise RuntimeError("compile_only needs compiled kernels: unset TRITON_INTERPRET before importing them")
    launches: list[CompiledLaunch] = []
    run = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        if kernel.metadata.target.arch != arch:  # Triton caches compiled kernels per device, not per target
            raise RuntimeError(f"compile_only: {self.fn.__name__} was already compiled for sm_{kernel.metadata.target.arch} "
                               f"in this process; use one process per target architecture")
        launches.append(CompiledLaunch(self.fn.__name__, kernel, dict(kwargs)))
        return kernel

    previous = driver._active
    driver.set_active(_CompileOnlyDriver(arch))
    JITFunction.run = record
    try:
        yield launches
    finally:
        JITFunction.run = run
        driver._active = previous


# -- reading SASS -----------------------------------------------------------------------------------
_LINE = re.compile(r"^\s*(?:[0-9a-f-]{2}:[0-9a-f-]:[0-9a-f-]:[0-9a-f-]:[0-9a-f]\s+)?(@!?U?P[0-9T]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)")
_LABEL = re.compile(r"^\s*(\.?L[A-Za-z0-9_]+|LBB[0-9_]+):")
_BRANCH = re.compile(r"\bBRA\s+(\.?L[A-Za-z0-9_]+|LBB[0-9_]+)")


@dataclass
class Loop:
    """A backward branch's body in the SASS: what one iteration executes (in program order)."""

    first: int
    last: int
    opcodes: collections.Counter = field(default_factory=collections.Counter)

    @property
    def instructions(self) -> int:
        return sum(self.opcodes.values())

    def count(self, prefix: str) -> int:
        return sum(v for k, v in self.opcodes.items() if k == prefix or k.startswith(prefix + "."))

    def loads(self) -> dict[str, int]:
        """Global loads by width: ``{"LDG.E.128": 4, "LDG.E.U8": 0, ...}``."""
        return {k: v for k, v in sorted(self.opcodes.items()) if k.startswith("LDG")}


def _opcode(line: str) -> str | None:
    m = _LINE.match(line)
    if not m:
        return None
    op = m.group(2)
    return None if op.endswith(":") else op


def sass_loops(sass: str) -> list[Loop]:
    """Every loop (label .. backward ``BRA`` to it) with its opcode histogram, innermost first."""
    lines = sass.splitlines()
    labels = {}
    for i, line in enumerate(lines):
        m = _LABEL.match(line)
        if m:
            labels[m.group(1)] = i
    loops = []
    for i, line in enumerate(lines):
        m = _BRANCH.search(line)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            loop = Loop(labels[m.group(1)], i)
            for body in lines[loop.first : i + 1]:
                op = _opcode(body)
                if op:
                    loop.opcodes[op] += 1
            loops.append(loop)
    return sorted(loops, key=lambda lp: lp.last - lp.first)


def sass_summary(sass: str) -> dict:
    """Whole-kernel and hottest-loop figures for a report (the largest loop is the main K loop)."""
    ops = collections.Counter(op for op in map(_opcode, sass.splitlines()) if op)
    loops = sass_loops(sass)
    main = max(loops, key=lambda lp: lp.instructions) if loops else None
    summary = {"instructions": sum(ops.values()), "loops": len(loops)}
    if main is not None:
        summary.update({
            "loop_instructions": main.instructions,
            "loop_barriers": main.count("BAR"),
            "loop_loads": main.loads(),
            "loop_idp4a": main.count("IDP"),
            "loop_mma": main.count("IMMA") + main.count("HMMA") + main.count("HGMMA") + main.count("IGMMA"),
            "loop_shared": main.count("LDS") + main.count("STS") + main.count("STSM") + main.count("LDSM"),
        })
    return summary
