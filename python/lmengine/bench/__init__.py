"""Benchmarking tools: S-MBU / S-MFU from the core's per-pass counters, hardware specs and
probes, energy telemetry, offline accuracy tasks and the ``lmengine bench cap`` report."""
