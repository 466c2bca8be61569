"""Peak extra resident memory of one call, measured in a fresh interpreter (Linux: reads /proc/self/status).

A test passes :func:`measure` the body of a script; :data:`PRELUDE`, run before it, defines
``status_kib(key)`` and ``peak_extra_kib(call)``: ``call()`` once after resetting the peak-RSS
high-water mark, returning ``(its result, VmHWM - VmRSS before the call)`` in KiB. The script
prints one JSON line last, which :func:`measure` returns decoded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

PRELUDE = textwrap.dedent("""
    def status_kib(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1])
    def peak_extra_kib(call):
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS high-water mark (Linux)
        before = status_kib("VmRSS")
        result = call()
        return result, status_kib("VmHWM") - before
""")


def measure(script: str, *args, timeout: float):
    """Run ``PRELUDE + script`` with ``sys.argv[1:] = args`` in a fresh interpreter; its last stdout line as JSON."""
    # a fixed mmap threshold makes glibc return large freed blocks at once: RSS tracks live tensors
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    out = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(script), *map(str, args)],
                         capture_output=True, text=True, check=True, timeout=timeout, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])
