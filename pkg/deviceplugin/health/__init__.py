"""GPU health: probes and NVML XID events folded into the set of unhealthy GPUs.

No gRPC here; the monitor reports to a callback (the seat board's ``set_unhealthy``).
"""
