"""The in-memory index of a rule's open reminders' digests (a full rescan's comparison)."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest

from reminders.open_digests import DIGEST, HEX, SIZE, OpenDigests, Overflow


def _digests(count: int, seed: int = 1) -> list[bytes]:
    generator = random.Random(seed)
    return [generator.randbytes(SIZE) for _ in range(count)]


def _index(digests: list[bytes], capacity: int | None = None, chunk: int = 500) -> OpenDigests:
    index = OpenDigests(len(digests) if capacity is None else capacity)
    for start in range(0, len(digests), chunk):
        index.add(b"".join(digests[start : start + chunk]))
    index.freeze()
    return index


def test_it_finds_exactly_the_digests_it_holds_against_a_set() -> None:
    """50,000 digests loaded in chunks, matched in batches mixing held and new ones: the answer
    is a Python set's, and each held one is counted the first time only."""
    held = _digests(50_000)
    index = _index(held)
    assert index.size == 50_000
    reference = set(held)
    newcomers = _digests(20_000, seed=2)
    generator = random.Random(3)
    asked = held[::2] + newcomers
    generator.shuffle(asked)
    counted = 0
    for start in range(0, len(asked), 2000):
        batch = asked[start : start + 2000]
        found, newly = index.match(b"".join(batch))
        assert found.tolist() == [digest in reference for digest in batch]
        counted += newly
    assert counted == 25_000
    # Asked again: found, but nothing is matched for the first time.
    found, newly = index.match(b"".join(held[:4000:2]))
    assert found.all() and newly == 0
    assert index.unmatched_count() == 25_000
    left = {bytes.fromhex(h) for chunk in index.unmatched(3000) for h in chunk}
    assert left == set(held[1::2])


def test_a_row_twice_in_one_batch_counts_its_reminders_once() -> None:
    held = _digests(10)
    index = _index(held)
    found, newly = index.match(held[3] + held[3] + held[4])
    assert found.tolist() == [True, True, True]
    assert newly == 2


def test_a_digest_several_reminders_carry_is_one_entry_counting_them_all() -> None:
    """A rule with three offsets: three reminders carry each row's digest."""
    held = _digests(100)
    index = _index([d for d in held for _ in range(3)])
    assert index.size == 300 and len(index.hi) == 100
    found, newly = index.match(held[7] + held[8])
    assert found.all() and newly == 6
    assert index.unmatched_count() == 98


def test_an_ambiguous_occurrence_is_never_matched_and_stays_unmatched() -> None:
    held = _digests(20)
    index = OpenDigests(22)
    index.add(b"".join(held[:18]))
    index.add(held[18] + held[19], ambiguous=True)  # one occurrence's two disagreeing reminders
    index.freeze()
    found, newly = index.match(b"".join(held))
    assert found.tolist() == [True] * 18 + [False, False]
    assert newly == 18
    assert {h for chunk in index.unmatched(10) for h in chunk} == {held[18].hex(), held[19].hex()}


def test_digests_alike_in_their_first_eight_bytes_are_told_apart() -> None:
    """Two digests sharing ``hi`` (its first 8 bytes) but not ``lo``: each is found as itself,
    and one not held that shares them is not found."""
    common = os.urandom(8)
    a, b, c = (
        common + b"\x00\x00\x00\x01",
        common + b"\x00\x00\x00\x05",
        common + b"\x00\x00\x00\x03",
    )
    index = _index([a, b, *_digests(1000)])
    found, newly = index.match(a + c + b)
    assert found.tolist() == [True, False, True]
    assert newly == 2


def test_digests_written_by_other_means_are_kept_as_never_matched() -> None:
    held = [d.hex() for d in _digests(5)]
    index = OpenDigests(8)
    index.add_hex([*held[:2], "x", "not-hex-but-24-chars-lng", *held[2:]])
    index.freeze()
    assert index.size == 7
    found, newly = index.match(bytes.fromhex("".join(held)))
    assert found.all() and newly == 5
    (odd, *rest) = list(index.unmatched(10))
    assert odd == ["x", "not-hex-but-24-chars-lng"] and rest == []
    assert len("not-hex-but-24-chars-lng") == HEX


def test_an_empty_index_finds_nothing() -> None:
    index = _index([])
    found, newly = index.match(b"".join(_digests(3)))
    assert found.tolist() == [False, False, False] and newly == 0
    assert index.unmatched_count() == 0 and list(index.unmatched(10)) == []


def test_more_digests_than_it_was_made_for_overflow() -> None:
    """Room is a region's share and eight standard deviations more: far more than promised
    does not fit, and says so rather than write past a region."""
    index = OpenDigests(100)
    with pytest.raises(Overflow):
        index.add(b"".join(_digests(100_000)))


def test_the_directory_search_agrees_with_numpy_at_every_size() -> None:
    """Sizes around the directory's steps (a prefix of 0 bits up to several): every held digest
    is found at its sorted place."""
    for count in (1, 3, 4, 5, 17, 64, 1000, 4097):
        held = _digests(count, seed=count)
        index = _index(held, chunk=7)
        packed = np.frombuffer(b"".join(held), dtype=DIGEST)
        order = np.lexsort((packed["lo"], packed["hi"]))
        assert index.hi.tolist() == packed["hi"][order].tolist()
        found, newly = index.match(b"".join(held))
        assert found.all() and newly == count, count


def test_digests_as_copy_writes_them_a_line_each() -> None:
    """PostgreSQL's COPY lines: the usual ones parsed at once, another writer's kept as they
    are, whatever the mix."""
    held = _digests(6)
    lines = b"".join(d.hex().encode() + b"\n" for d in held)
    index = OpenDigests(10)
    index.add_lines(lines[: 25 * 3])
    index.add_lines(lines[25 * 3 :] + b"x\n" + b"z" * 24 + b"\n" + b"a\\\\b\\tc\n")
    index.freeze()
    assert index.size == 9
    found, newly = index.match(b"".join(held))
    assert found.all() and newly == 6
    # As the reminders carry them: COPY's escapes (a backslash, a tab) undone.
    assert next(index.unmatched(10)) == ["x", "z" * 24, "a\\b\tc"]
