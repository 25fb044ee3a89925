"""Attention kernels over the paged KV cache.

``reference.py`` holds the plain-torch versions: they run everywhere (they are the CPU backend) and
are the oracle every Triton kernel in this folder is tested against.
"""
