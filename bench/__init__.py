"""Benchmarks of kyb-device-plugin: ``python -m bench [--quick] [--json PATH]``.

Every latency, throughput and memory figure is measured next to a baseline taken in the
same run on the same machine (a bare grpcio echo server, a bare ``python`` start), so the
ratios mean something on a shared, noisy machine where absolute numbers do not.
"""
