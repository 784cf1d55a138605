"""Image math in torch, batched on the worker's device; the same code runs on CPU and GPU.

Ops import these modules when they first compute, not when they are registered, so that listing ops,
validating pipelines and starting the CLI never pay for importing torch.
"""
