"""What a compiled kernel uses, read from its cubin's SASS: registers, spills, tensor-core instructions."""

from __future__ import annotations

import re
import subprocess
import tempfile


def sass_summary(cubin: bytes) -> dict:
    """Registers, stack frame (spill) bytes and tensor-core instruction counts of a cubin."""
    import triton

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [triton.knobs.nvidia.cuobjdump.path, "-res-usage", "-sass", f.name],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    return {
        "regs": int(usage[1]),
        "spill": int(usage[2]) + int(usage[4]),
        "static_shared": int(usage[3]),
        "hgmma": len(re.findall(r"\bHGMMA\.", out)),
        "hmma": len(re.findall(r"\bHMMA\.", out)),
    }
