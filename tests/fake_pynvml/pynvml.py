"""`pynvml` for a subprocess (this folder goes first on PYTHONPATH): the GPUs come from
$FAKE_NVML_GPUS, `name:total:free` separated by `;` (bytes)."""

from __future__ import annotations

import os

from tests.nvml import FakeGpu, FakeNvml

_fake = FakeNvml(
    [
        FakeGpu(name, int(total), int(free))
        for name, total, free in (
            g.split(":") for g in os.environ.get("FAKE_NVML_GPUS", "").split(";") if g
        )
    ]
)
globals().update({k: v for k, v in vars(_fake.module()).items() if not k.startswith("__")})
