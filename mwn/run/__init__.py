"""One run or a vectorised group and the folder it lives in: build, the one loop, what vmap
adds, recording, the folder, checkpoints, acceleration, ranks, evaluation, and the names of the
folder's files (files.py)."""
