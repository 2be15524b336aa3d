"""Detect this node's resources: CPUs and memory through psutil, GPUs through NVML."""

from __future__ import annotations

from typing import Any

import psutil


def detect_gpus() -> tuple[list[dict[str, Any]], str | None]:
    """Return the GPUs NVML sees (index, name, memory, uuid) and why none, if none.

    NVML's order can differ from CUDA's, so each GPU carries its UUID.
    """
    try:
        import pynvml
    except ImportError as exc:
        return [], f"pynvml not importable: {exc}"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return [], f"NVML unavailable: {exc}"
    except Exception as exc:  # a broken driver install raises odd things
        return [], f"NVML failed: {exc!r}"
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append({
                "index": i,
                "name": name.decode() if isinstance(name, bytes) else str(name),
                "uuid": uuid.decode() if isinstance(uuid, bytes) else str(uuid),
                "memory": int(mem.total),
            })
        return gpus, None if gpus else "NVML reports 0 devices"
    except pynvml.NVMLError as exc:
        return [], f"NVML query failed: {exc}"
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def detect(num_cpus: float | None = None, num_gpus: float | None = None,
           memory: int | None = None, custom: dict[str, float] | None = None
           ) -> tuple[dict[str, float], list[dict[str, Any]], str | None]:
    """Resources of this node; explicit numbers override what is detected."""
    gpus, why = detect_gpus()
    resources: dict[str, float] = {
        "CPU": float(num_cpus) if num_cpus is not None else float(psutil.cpu_count() or 1),
        "GPU": float(num_gpus) if num_gpus is not None else float(len(gpus)),
        "memory": float(memory) if memory is not None
        else float(int(psutil.virtual_memory().total * 0.7)),
    }
    for name, amount in (custom or {}).items():
        resources[name] = float(amount)
    if resources["GPU"] == 0:
        resources.pop("GPU")
    return resources, gpus, why
