"""Mutation fuzzing of every reader of untrusted input (checkpoints, configs, samples, data files).

    python -m tests.fuzz.run [--reader NAME ...] [--count 1000] [--seed 0] [--json OUT]
    python -m tests.fuzz.run --reader NAME --seed S --case I [--save DIR]   # replay one case

* ``seeds.py``   the valid files each reader is fed mutations of (built deterministically);
* ``mutate.py``  the mutators: generic byte-level ones and format-aware ones (safetensors header,
                 .npy/.npz headers, zip headers, protobuf varints, pickle opcodes, YAML, PNG/JPEG);
* ``readers.py`` how each reader is run on a file and how its result is judged;
* ``run.py``     the harness: case ``i`` of reader ``R`` with seed ``s`` is a pure function of
                 ``(R, s, i)``; each case runs in a forked child, killed after 10 s, its peak
                 memory read from ``os.wait4``.

Outcomes of a case: ``accepted`` (the result passed the reader's check), ``rejected`` (the
reader refused it cleanly: exit code 2 with a one-line message, or for the data readers an
exception the training loop skips and counts), or a failure (a traceback, a wrong result,
a timeout, more than 1 GB, or a crash).
"""
