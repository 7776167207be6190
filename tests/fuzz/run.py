"""The fuzz harness: seeded mutations of valid files, each read in a forked child under limits.

    python -m tests.fuzz.run [--reader NAME ...] [--count 1000] [--seed 0] [--json OUT]
    python -m tests.fuzz.run --reader NAME --seed S --case I [--save DIR] [--no-fork]   # replay one case

Case ``i`` of reader ``R`` with seed ``s`` draws everything (which valid file, which mutator,
every choice it makes) from ``random.Random(f"{R}/{s}/{i}")``, so it replays exactly. Each
case runs in a child forked after everything is imported; the parent kills it after
``--timeout`` seconds (10) and reads its peak memory from ``os.wait4`` (``ru_maxrss`` minus
the parent's RSS at the fork); more than ``--max-mb`` (1024) MB is a failure. The child also
runs under an address-space limit a few GB above the parent's, so a bomb that gets past a
reader cannot take the machine down with it.

Exit status: 0 when no case failed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import select
import shutil
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")

from tests.fuzz import mutate, readers, seeds  # noqa: E402

TIMEOUT_S = 10.0
MAX_MB = 1024
ADDRESS_SPACE_SLACK = 4 << 30
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * _PAGE


def _vm_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[0]) * _PAGE


def _changed_ranges(old: bytes, new: bytes) -> list[tuple[int, int]] | None:
    """Byte ranges of ``old`` that ``new`` changed in place; None when the length changed."""
    if len(old) != len(new):
        return None
    import numpy as np

    a = np.frombuffer(old, np.uint8)
    b = np.frombuffer(new, np.uint8)
    where = np.flatnonzero(a != b)
    ranges: list[tuple[int, int]] = []
    for position in where.tolist():
        if ranges and ranges[-1][1] == position:
            ranges[-1] = (ranges[-1][0], position + 1)
        else:
            ranges.append((position, position + 1))
    return ranges


def run_in_child(function, timeout: float, max_mb: int, fork: bool = True) -> dict:
    """``function()``'s outcome dict, run in a forked child; a failure on a traceback, crash, timeout or memory."""
    if not fork:
        started = time.monotonic()
        try:
            outcome = function()
        except BaseException:  # noqa: BLE001
            outcome = readers.failure("traceback:\n" + traceback.format_exc())
        outcome["seconds"] = round(time.monotonic() - started, 3)
        return outcome
    read_fd, write_fd = os.pipe()
    base_rss, base_vm = _rss_bytes(), _vm_bytes()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child
        code = 0
        try:
            os.close(read_fd)
            limit = base_vm + ADDRESS_SPACE_SLACK
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            try:
                outcome = function()
            except BaseException:  # noqa: BLE001 - any escape is the failure being looked for
                outcome = readers.failure("traceback:\n" + traceback.format_exc()[-6000:])
            payload = json.dumps(outcome, default=str).encode()
            view = memoryview(payload)
            while view:
                written = os.write(write_fd, view)
                view = view[written:]
        except BaseException:  # noqa: BLE001
            code = 3
        finally:
            os._exit(code)
    os.close(write_fd)
    chunks, timed_out = [], False
    deadline = started + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        ready, _, _ = select.select([read_fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(read_fd, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    if timed_out:
        os.kill(pid, signal.SIGKILL)
    os.close(read_fd)
    _, status, usage = os.wait4(pid, 0)
    seconds = time.monotonic() - started
    peak_mb = max(0.0, (usage.ru_maxrss * 1024 - base_rss) / 2**20)
    if timed_out:
        return readers.failure(f"timeout: still running after {timeout:.0f} s (killed)", seconds=round(seconds, 3),
                               peak_mb=round(peak_mb, 1))
    if os.WIFSIGNALED(status):
        outcome = readers.failure(f"crashed with signal {os.WTERMSIG(status)}")
    elif os.WEXITSTATUS(status) != 0 or not chunks:
        outcome = readers.failure(f"child exited {os.WEXITSTATUS(status)} without an outcome")
    else:
        outcome = json.loads(b"".join(chunks))
    if peak_mb > max_mb and outcome["status"] != "failure":
        outcome = readers.failure(f"memory: peak {peak_mb:.0f} MB above the parent (limit {max_mb} MB); "
                                  f"it was {outcome['status']}: {outcome.get('message', '')[:300]}")
    outcome["seconds"] = round(seconds, 3)
    outcome["peak_mb"] = round(peak_mb, 1)
    return outcome


@dataclass
class Case:
    reader: str
    seed: int
    index: int
    variant: str
    mutator: str
    outcome: dict

    @property
    def replay(self) -> str:
        return f"python -m tests.fuzz.run --reader {self.reader} --seed {self.seed} --case {self.index}"


@dataclass
class ReaderResult:
    reader: str
    seed: int
    cases: int = 0
    accepted: int = 0
    rejected: int = 0
    failures: list[Case] = field(default_factory=list)
    seconds: float = 0.0
    by_mutator: dict = field(default_factory=dict)
    max_seconds: float = 0.0
    max_peak_mb: float = 0.0
    nonfinite_accepted: int = 0
    changed_accepted: int = 0

    def to_dict(self) -> dict:
        return {"reader": self.reader, "seed": self.seed, "cases": self.cases, "accepted": self.accepted,
                "rejected": self.rejected, "failures": len(self.failures), "seconds": round(self.seconds, 1),
                "max_case_seconds": self.max_seconds, "max_case_peak_mb": self.max_peak_mb,
                "accepted_with_changed_values": self.changed_accepted,
                "accepted_with_nonfinite_values": self.nonfinite_accepted, "by_mutator": self.by_mutator,
                "failure_cases": [{"case": c.index, "variant": c.variant, "mutator": c.mutator,
                                   "message": c.outcome.get("message", "")[-3000:], "replay": c.replay}
                                  for c in self.failures]}


_VARIANTS: dict[str, list] = {}


def variants_for(reader: str, root: Path) -> list:
    if reader not in _VARIANTS:
        _VARIANTS[reader] = seeds.build_all(readers.READERS[reader].seed_kind, root / "seeds" / reader)
    return _VARIANTS[reader]


def make_case(reader: str, seed: int, index: int, root: Path):
    """(variant, mutated bytes, mutator name, label bytes or None) of case ``index``."""
    rng = random.Random(f"{reader}/{seed}/{index}")
    variants = variants_for(reader, root)
    variant = variants[rng.randrange(len(variants))]
    label = None
    if reader == "latent" and rng.random() < 0.25:  # the label file mutated instead of the features
        label, name = mutate.mutate("latent", variant.info["label"], rng, variant)
        return variant, variant.data, "label:" + name, label
    data, name = mutate.mutate(reader, variant.data, rng, variant)
    return variant, data, name, label


def run_reader(reader: str, count: int, seed: int, root: Path, cases=None, timeout: float = TIMEOUT_S,
               max_mb: int = MAX_MB, fork: bool = True, save: Path | None = None, progress=None) -> ReaderResult:
    readers.prepare(reader)
    spec = readers.READERS[reader]
    result = ReaderResult(reader, seed)
    started = time.monotonic()
    workdir = root / "cases" / reader
    for index in (range(count) if cases is None else cases):
        variant, data, mutator_name, label = make_case(reader, seed, index, root)
        if save is not None:
            save.mkdir(parents=True, exist_ok=True)
            (save / f"{reader}-{seed}-{index}.{variant.suffix}").write_bytes(data)
            if label is not None:
                (save / f"{reader}-{seed}-{index}.label.npy").write_bytes(label)
        if workdir.exists():
            shutil.rmtree(workdir)
        target = readers.place(reader, workdir, variant, data, label)
        touched = _changed_ranges(variant.data, data) if "spans" in variant.info else None
        marker = Path(mutate.MARKER)
        marker.unlink(missing_ok=True)
        outcome = run_in_child(lambda: spec.run(target, variant, touched), timeout, max_mb, fork)
        if marker.exists():
            marker.unlink()
            outcome = readers.failure(f"the file ran code: {marker} was created ({outcome['status']}: "
                                      f"{outcome.get('message', '')[:300]})")
        if mutator_name == "pickle_attack" and outcome["status"] == "accepted":
            outcome = readers.failure("a crafted pickle was accepted")
        status = outcome["status"]
        result.cases += 1
        mutator_key = mutator_name.split(" ")[0]
        counts = result.by_mutator.setdefault(mutator_key, {"accepted": 0, "rejected": 0, "failure": 0})
        counts[status] += 1
        result.max_seconds = max(result.max_seconds, outcome.get("seconds", 0.0))
        result.max_peak_mb = max(result.max_peak_mb, outcome.get("peak_mb", 0.0))
        if status == "accepted":
            result.accepted += 1
            result.changed_accepted += bool(outcome.get("changed"))
            result.nonfinite_accepted += bool(outcome.get("nonfinite"))
        elif status == "rejected":
            result.rejected += 1
        else:
            result.failures.append(Case(reader, seed, index, variant.name, mutator_name, outcome))
        if progress:
            progress(reader, index, variant.name, mutator_name, outcome)
    result.seconds = time.monotonic() - started
    return result


def summary_line(result: ReaderResult) -> str:
    return (f"{result.reader:12s} seed {result.seed}: {result.cases} cases, {result.accepted} accepted, "
            f"{result.rejected} rejected cleanly, {len(result.failures)} failures "
            f"(max {result.max_seconds:.2f} s, {result.max_peak_mb:.0f} MB per case; {result.seconds:.0f} s)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--reader", action="append", choices=list(readers.READERS),
                        help="reader to fuzz (repeatable; default: all)")
    parser.add_argument("--count", type=int, default=1000, help="cases per reader (default 1000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--case", type=int, action="append", help="run only this case (repeatable): replay")
    parser.add_argument("--start", type=int, default=0, help="first case index (default 0)")
    parser.add_argument("--json", help="write the counts and every failure to this JSON file")
    parser.add_argument("--save", help="keep each mutated file in this folder")
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds per case (default 10)")
    parser.add_argument("--max-mb", type=int, default=MAX_MB, help="peak memory per case in MB (default 1024)")
    parser.add_argument("--no-fork", action="store_true", help="run cases in this process (debugging)")
    parser.add_argument("--verbose", "-v", action="store_true", help="one line per case")
    args = parser.parse_args(argv)
    names = args.reader or list(readers.READERS)
    root = Path(tempfile.mkdtemp(prefix="dir-fuzz-"))

    def progress(reader, index, variant, mutator, outcome):
        if args.verbose or args.case or outcome["status"] == "failure":
            message = outcome.get("message", "")
            if outcome["status"] != "failure":
                message = message.splitlines()[0][:160] if message else ""
            print(f"  {reader} case {index} [{variant} / {mutator}] {outcome['status']} "
                  f"({outcome.get('seconds', 0):.2f} s, {outcome.get('peak_mb', 0):.0f} MB): {message}", flush=True)

    results = []
    try:
        for name in names:
            cases = args.case if args.case else range(args.start, args.start + args.count)
            result = run_reader(name, args.count, args.seed, root, cases=list(cases), timeout=args.timeout,
                                max_mb=args.max_mb, fork=not args.no_fork,
                                save=Path(args.save) if args.save else None, progress=progress)
            results.append(result)
            print(summary_line(result), flush=True)
            for case in result.failures:
                print(f"    failure: case {case.index} ({case.variant} / {case.mutator}): replay with {case.replay}",
                      flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"seed": args.seed, "readers": [r.to_dict() for r in results]},
                                              indent=1) + "\n")
    return 1 if any(r.failures for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
