"""Everything that touches files: run layout, Arrow schemas, commit markers, checkpoints and the run lock.

Nothing else in ppoflow builds a path or opens a file; every location is an fsspec URI (a local folder by default,
`memory://`, `s3://`, ...). This package imports nothing else of ours.
"""
