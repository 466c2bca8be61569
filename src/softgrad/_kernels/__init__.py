"""Row-wise kernels, one module per backend, all with the same signatures.

See ``docs/ARCHITECTURE.md`` ("Kernel contract"). Inputs are validated by the public
functions before they arrive here; kernels never check arguments.
"""
