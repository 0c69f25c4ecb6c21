"""Hardware facts: datasheet bf16 dense peaks on GPUs and a measured matmul peak on CPU (for MFU); GPU
memory, node RAM and on-demand prices of common instance types (for `llmray plan`)."""

from __future__ import annotations

import functools
import time

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, in TFLOP/s.
GPU_PEAK_TFLOPS: dict[str, float] = {
    "B200": 2250.0,
    "H200": 989.0,
    "H100": 989.0,  # SXM; the PCIe card is 756
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 70.0,
    "V100": 125.0,  # fp16; V100 has no bf16
}

# EC2 instance family -> GPU model, longest prefix first.
INSTANCE_GPU: dict[str, str] = {
    "p5en.": "H200",
    "p5e.": "H200",
    "p5.": "H100",
    "p4de.": "A100",
    "p4d.": "A100",
    "g6e.": "L40S",
    "g6.": "L4",
    "g5.": "A10G",
    "p3.": "V100",
}


# GPU memory by EC2 instance family (longest prefix first): p4d carries 40 GB A100s, p4de 80 GB ones.
INSTANCE_GPU_MEMORY_GIB: dict[str, float] = {
    "p5en.": 141, "p5e.": 141, "p5.": 80, "p4de.": 80, "p4d.": 40, "g6e.": 48, "g6.": 24, "g5.": 24,
    "p3dn.": 32, "p3.": 16,
}
GPU_MEMORY_GIB: dict[str, float] = {
    "B200": 180, "H200": 141, "H100": 80, "A100": 80, "L40S": 48, "L4": 24, "A10G": 24, "V100": 16,
}

# Node RAM in GiB, for offloaded ZeRO states (a node type's `resources: {memory: bytes}` wins).
INSTANCE_RAM_GIB: dict[str, float] = {
    "p5.48xlarge": 2048, "p5en.48xlarge": 2048, "p4d.24xlarge": 1152, "p4de.24xlarge": 1152, "g5.xlarge": 16,
    "g5.12xlarge": 192, "g5.48xlarge": 768, "g6.xlarge": 16, "g6e.xlarge": 32,
}

# On-demand Linux list prices in USD per hour (us-west-2, late 2025), for the shipped file's instance types
# and a few common ones. Estimates: check the provider's price page, or set `plan.prices` (reserved and
# spot prices differ a lot).
DEFAULT_PRICES: dict[str, float] = {
    "m6i.2xlarge": 0.384, "m6i.4xlarge": 0.768, "p5.48xlarge": 55.04, "p4d.24xlarge": 21.96,
    "g5.xlarge": 1.006, "g5.12xlarge": 5.672, "g6.xlarge": 0.805,
}


def gpu_model_of_instance(instance_type: str | None) -> str | None:
    """`p5.48xlarge` -> `H100`; None when unknown."""
    if not instance_type:
        return None
    for prefix in sorted(INSTANCE_GPU, key=len, reverse=True):
        if instance_type.startswith(prefix):
            return INSTANCE_GPU[prefix]
    return None


def gpu_peak_flops(name: str) -> float | None:
    """Peak FLOP/s of a GPU named like `NVIDIA H100 80GB HBM3` or `H100`; None when unknown."""
    upper = name.upper()
    for model in sorted(GPU_PEAK_TFLOPS, key=len, reverse=True):
        if model in upper:
            if model == "H100" and "PCIE" in upper:
                return 756e12
            return GPU_PEAK_TFLOPS[model] * 1e12
    return None


@functools.lru_cache(maxsize=4)
def cpu_peak_flops(dtype_name: str = "float32", size: int = 1024, seconds: float = 0.5) -> float:
    """Measured matmul FLOP/s of this process's CPU threads (the best of a few timed runs).

    CPUs have no honest datasheet peak across SKUs and thread counts, so MFU on CPU is against what a
    large matmul actually reaches here, in the dtype the model computes in. Timed with `F.linear`, the op
    a transformer's layers call: on CPUs without native bf16, `torch.mm` takes a ~10x slower bf16 path
    than `F.linear`'s oneDNN kernel, and MFU against it would read above 100%.
    """
    import torch
    from torch.nn.functional import linear

    dtype = getattr(torch, dtype_name)
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    linear(a, b)  # warm-up
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        linear(a, b)
        dt = time.perf_counter() - t0
        best = max(best, 2 * size**3 / dt)
    return best


def device_peak_flops(device: object, dtype_name: str = "bfloat16") -> float | None:
    """Peak FLOP/s for a torch device: datasheet on CUDA, measured on CPU."""
    import torch

    dev = torch.device(device)  # type: ignore[call-overload]
    if dev.type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(dev))
    return cpu_peak_flops(dtype_name)
