"""Runtime: where and how code runs (devices, distributed process groups, progress bars).

Shared by training and analysis; imports nothing else of dtprobe but the errors.
"""
