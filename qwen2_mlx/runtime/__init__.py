"""What a command's process needs before its work: OpenBLAS preloaded on a Linux CPU (`blas.py`, and
`pytest_openblas.py` for the test run), the optional packages its outputs need (`packages.py`) and free
ports for `mlx.launch`'s ring backend (`ports.py`). Standard library only, so every layer may import it.
"""
