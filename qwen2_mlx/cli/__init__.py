"""Helpers shared by the command lines: the OpenBLAS re-run on Linux and the long-context switches."""
