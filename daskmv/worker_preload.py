"""What a local cluster's worker processes import, imported once in the fork server that starts them.

:func:`daskmv.cluster.local_cluster` starts its CPU workers from a ``multiprocessing`` fork server that
preloads this module: each worker is then a fork of a process that has already imported Dask's worker,
OpenCV, pyarrow, Zarr and daskmv's partition code, instead of a fresh interpreter importing them all
again (0.5-1 s of CPU each before its first partition). The imported modules' memory is shared
copy-on-write between the fork server and every worker it starts.
"""

import gc

try:
    import distributed.nanny  # noqa: F401  (the worker process's entry point)
    import distributed.worker  # noqa: F401

    import daskmv.partition  # noqa: F401  (numpy, OpenCV, pyarrow, Zarr, the built-in ops)
except Exception:  # a worker then imports what it needs itself, and reports what is wrong there
    pass

# Objects made by these imports live as long as the workers: keep the garbage collector from writing to
# them (its bookkeeping would copy every page they share with the fork server into each worker).
gc.freeze()
