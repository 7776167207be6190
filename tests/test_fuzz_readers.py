"""Every reader of untrusted input, fed seeded mutations of valid files (tests/fuzz): no failure.

A seeded subset of what ``python -m tests.fuzz.run`` runs (1000 cases per reader): each case
in a forked child, killed after 10 s, its peak memory checked against 1 GB. A failure is
a traceback, a crash, a timeout, too much memory, a result that fails the reader's check,
or a message that is not one line; the message names the case to replay.
"""
import importlib.util

import pytest

from tests.fuzz import readers
from tests.fuzz.run import run_reader

SEED = 0
COUNTS = {"safetensors": 60, "pdparams": 60, "ckpt": 60, "pth": 50, "yaml": 80, "samples": 30, "image": 60,
          "latent": 60}
NEEDS = {"pth": "torch", "ckpt": "google.protobuf"}


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except ModuleNotFoundError:
        return True


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.mark.parametrize("reader", list(COUNTS))
def test_mutations_are_accepted_or_rejected_cleanly(reader, root):
    if reader in NEEDS and _missing(NEEDS[reader]):
        pytest.skip(f"{NEEDS[reader]} is not installed")
    result = run_reader(reader, COUNTS[reader], SEED, root)
    failures = "\n".join(f"case {c.index} ({c.variant} / {c.mutator}): {c.outcome.get('message', '')[:1500]}\n"
                         f"  replay: {c.replay}" for c in result.failures)
    assert not result.failures, f"{len(result.failures)} of {result.cases} {reader} cases failed:\n{failures}"
    assert result.cases == COUNTS[reader] == result.accepted + result.rejected
    assert result.rejected > 0, f"no {reader} mutation was rejected"
    if readers.READERS[reader].can_accept:
        assert result.accepted > 0, f"no {reader} mutation was accepted"
