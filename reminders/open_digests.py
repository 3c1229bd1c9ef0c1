"""The row digests of a rule's open reminders, held in memory for a full rescan.

A rescan's question for each row is whether the reminders of its occurrence already carry its
digest (:meth:`reminders.planner.Planner.identify`: the rule's schedule settings and every value
of the row). Asked of the state DB, that is a lookup a row, and the row's occurrence recorded for
the vanished check. Asked of this index, it is a few vectorised steps a batch: the digests of
the rule's open reminders within grace, loaded once at the start of the scan, about 14 bytes a
reminder (the 12-byte digest, a state byte, a share of the directory). Ten million open
reminders measured 165 MB; a rule with more than :data:`LIMIT` is compared the other way.

A row whose digest is here is unchanged and names its occurrence: its reminders are marked
matched and nothing else is done for it. A row whose digest is not here (new, changed, or one
the index cannot vouch for) is compared in the state DB as before. At the end, the reminders
never matched are the only ones that may have vanished (:meth:`OpenDigests.unmatched`).

The layout, for speed and a memory peak no higher than the index itself:

- The digests are uniformly distributed (BLAKE2b), so their first byte spreads them evenly over
  256 regions of one preallocated array, each with room for its expected share and eight
  standard deviations more. Loading appends each digest to its region; then each region is
  sorted on its own and moved down, so the array ends sorted and dense without ever being
  copied whole.
- A directory of the first position of each of about ``n / 4`` prefixes (their top bits) turns
  a lookup into a binary search over a handful of entries: a few vectorised steps for a whole
  batch, each a gather whose cache misses overlap, where a binary search over the whole array
  waits for one miss after another: measured at 230 ns a digest at a million and at ten million
  entries, against numpy's ``searchsorted`` at 270 and 760.
"""

from __future__ import annotations

import binascii
import math
import re
from collections.abc import Iterator, Sequence

import numpy as np

from .errors import RemindersError

DIGEST = np.dtype([("hi", "<u8"), ("lo", "<u4")])  # a row digest: BLAKE2b's 12 bytes
SIZE = DIGEST.itemsize
HEX = 2 * SIZE
LIMIT = 12_000_000  # open reminders of a rule the index holds at most: about 200 MB of them
UNMATCHED, MATCHED, AMBIGUOUS = 0, 1, 2  # an entry's state
_REGIONS = 256
_REGION_SHIFT = np.uint64(56)
_PER_PREFIX = 4  # entries a directory prefix holds on average


_COPY_ESCAPE = re.compile(r"\\(.)")
_COPY_ESCAPES = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}


def _unescape(found: re.Match[str]) -> str:
    return _COPY_ESCAPES.get(found[1], found[1])


class Overflow(RemindersError):
    """More digests than the index was made for (reminders added while it loaded): the scan
    compares the other way."""


class OpenDigests:
    """The digests of a rule's open reminders within grace, an entry a distinct digest (with
    how many reminders carry it).

    Made for at most ``capacity`` reminders; built with :meth:`add` (digests in any order),
    then :meth:`freeze`; then :meth:`match` each batch of rows' digests, and :meth:`unmatched`
    at the end. An occurrence whose open reminders carry different digests is added
    ``ambiguous``: a row never matches it (its row is compared in the state DB, which sorts
    that out) and its reminders count as unmatched.
    """

    def __init__(self, capacity: int) -> None:
        share = capacity / _REGIONS
        self._room = math.ceil(share + 8 * math.sqrt(share) + 16)
        self._end = np.arange(1, _REGIONS + 1, dtype=np.intp) * self._room
        self._fill = self._end - self._room
        # Untouched pages of np.empty cost no memory: only what is filled is resident.
        self.hi = np.empty(_REGIONS * self._room, dtype=np.uint64)
        self.lo = np.empty(_REGIONS * self._room, dtype=np.uint32)
        self.state = np.empty(0, dtype=np.uint8)
        self.count: np.ndarray | None = None  # reminders an entry, None: one each
        self._ambiguous: list[bytes] = []
        self.odd: list[str] = []  # digests of another kind, as the reminders carry them
        self.size = 0  # reminders added
        self._first = np.zeros(2, dtype=np.intp)
        self._shift = np.uint64(0)
        self._bits = 0
        self._steps = 0

    def add_hex(self, digests: Sequence[str], *, ambiguous: bool = False) -> None:
        """Add reminders' digests as they carry them (hex). One that is not a digest of this
        kind (a reminder written by other means) is kept as it is, as never matched."""
        if all(len(digest) == HEX for digest in digests):
            try:
                self.add(bytes.fromhex("".join(digests)), ambiguous=ambiguous)
                return
            except ValueError:
                pass
        good = []
        for digest in digests:
            try:
                raw = bytes.fromhex(digest) if len(digest) == HEX else b""
            except ValueError:
                raw = b""
            if raw:
                good.append(raw)
            else:
                self.odd.append(digest)
                self.size += 1
        self.add(b"".join(good), ambiguous=ambiguous)

    def add_lines(self, lines: bytes) -> None:
        """Add reminders' digests as PostgreSQL's COPY writes them: hex, a line each."""
        count = lines.count(b"\n")
        if len(lines) == (HEX + 1) * count and lines[HEX :: HEX + 1] == b"\n" * count:
            try:
                self.add(binascii.unhexlify(lines.replace(b"\n", b"")))
                return
            except binascii.Error:
                pass
        # COPY's text format writes a backslash, and the controls it escapes, with a backslash.
        text = lines.decode().removesuffix("\n")
        self.add_hex(
            [_COPY_ESCAPE.sub(_unescape, line) for line in text.split("\n")] if text else []
        )

    def add(self, digests: bytes, *, ambiguous: bool = False) -> None:
        """Add reminders' digests, concatenated (12 bytes each). Raises :class:`Overflow`
        when a region is full."""
        if not digests:
            return
        found = np.frombuffer(digests, dtype=DIGEST)
        region = (found["hi"] >> _REGION_SHIFT).astype(np.intp)
        order = np.argsort(region, kind="stable")
        region = region[order]
        added = np.bincount(region, minlength=_REGIONS)
        if (self._fill + added > self._end).any():
            raise Overflow(f"more than {self._room} digests in a region")
        # Each digest's place: its region's next free one, plus its rank in this batch.
        rank = np.arange(len(found)) - (np.cumsum(added) - added)[region]
        at = self._fill[region] + rank
        self.hi[at] = found["hi"][order]
        self.lo[at] = found["lo"][order]
        self._fill += added
        self.size += len(found)
        if ambiguous:
            self._ambiguous.append(digests)

    def freeze(self) -> None:
        """Sort each region by (hi, lo) and move it down next to the one before, an entry a
        distinct digest; then the directory. Only then can rows be matched."""
        counts: list[np.ndarray | None] = []  # reminders an entry, by region (None: one each)
        end = 0
        for region in range(_REGIONS):
            start = region * self._room
            hi = self.hi[start : self._fill[region]]
            lo = self.lo[start : self._fill[region]]
            order = np.lexsort((lo, hi))
            hi, lo = hi[order], lo[order]  # copies: the moves below may overlap them
            distinct = np.ones(len(hi), dtype=bool)
            distinct[1:] = (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])
            starts = np.flatnonzero(distinct)
            carried = np.diff(np.append(starts, len(hi)))
            counts.append(None if (carried == 1).all() else carried.astype(np.uint32))
            self.hi[end : end + len(starts)] = hi[starts]
            self.lo[end : end + len(starts)] = lo[starts]
            end += len(starts)
        self.hi, self.lo = self.hi[:end], self.lo[:end]
        self.state = np.zeros(end, dtype=np.uint8)
        if any(carried is not None for carried in counts):  # several offsets: several a digest
            self.count = np.concatenate(
                [
                    np.ones(self._fill[region] - region * self._room, dtype=np.uint32)
                    if carried is None
                    else carried
                    for region, carried in enumerate(counts)
                ]
            )
        self._directory()
        for digests in self._ambiguous:
            self._find(np.frombuffer(digests, dtype=DIGEST), AMBIGUOUS)
        self._ambiguous.clear()

    def _directory(self) -> None:
        """The first entry of each prefix of ``_bits`` bits (and the end after the last)."""
        entries = len(self.hi)
        self._bits = max(0, math.ceil(math.log2(max(entries, 1) / _PER_PREFIX)))
        if self._bits == 0:
            self._first = np.array([0, entries], dtype=np.intp)
        else:
            self._shift = np.uint64(64 - self._bits)
            prefixes = 1 << self._bits
            self._first = np.empty(prefixes + 1, dtype=np.uint32 if entries < 2**32 else np.intp)
            self._first[-1] = entries
            step = 1 << 20  # no temporary the size of the directory
            for start in range(0, prefixes, step):
                bounds = np.arange(start, min(start + step, prefixes), dtype=np.uint64)
                self._first[start : start + len(bounds)] = np.searchsorted(
                    self.hi, bounds << self._shift
                )
        widest = int(np.diff(self._first).max()) if entries else 0
        self._steps = widest.bit_length()

    def _find(self, digests: np.ndarray, mark: int) -> tuple[np.ndarray, int]:
        """Which of ``digests`` are here (a boolean each) and how many reminders they matched
        for the first time; their entries are set to ``mark``. An ambiguous entry is found only
        when marking ambiguous ones."""
        entries = len(self.hi)
        if not entries:
            return np.zeros(len(digests), dtype=bool), 0
        hi, lo = np.ascontiguousarray(digests["hi"]), digests["lo"]
        prefix = (hi >> self._shift).astype(np.intp) if self._bits else np.zeros(len(hi), np.intp)
        # A binary search a digest within its prefix's entries, all digests at once.
        low = self._first[prefix].astype(np.intp)
        high = self._first[prefix + 1].astype(np.intp)
        last = entries - 1
        for _ in range(self._steps):
            open_ = low < high
            middle = (low + high) >> 1
            below = self.hi[np.minimum(middle, last)] < hi
            low = np.where(open_ & below, middle + 1, low)
            high = np.where(open_ & ~below, middle, high)
        at = np.minimum(low, last)
        # Digests alike in their first 8 bytes lie in the order of their last 4 (rarely any).
        while (behind := (self.hi[at] == hi) & (self.lo[at] < lo) & (at < last)).any():
            at += behind
        here = (self.hi[at] == hi) & (self.lo[at] == lo)
        if mark != AMBIGUOUS:
            here &= self.state[at] != AMBIGUOUS
        at = at[here]
        first = np.sort(at[self.state[at] == UNMATCHED])
        if len(first) > 1:  # a row twice counts once
            first = first[np.append(True, first[1:] != first[:-1])]
        newly = len(first) if self.count is None else int(self.count[first].sum())
        self.state[at] = mark
        return here, newly

    def match(self, digests: bytes) -> tuple[np.ndarray, int]:
        """Match a batch's row digests (12 bytes each, concatenated): which rows' digests are
        here (a boolean a row) and how many reminders this batch matched for the first time (a
        row the query returns twice matches its reminders once)."""
        return self._find(np.frombuffer(digests, dtype=DIGEST), MATCHED)

    def unmatched_count(self) -> int:
        """Entries no row matched (an entry a distinct digest)."""
        return len(self.odd) + int(np.count_nonzero(self.state != MATCHED))

    def unmatched(self, chunk: int) -> Iterator[list[str]]:
        """The digests (hex, as the reminders carry them) of the entries no row matched,
        ``chunk`` at a time."""
        for start in range(0, len(self.odd), chunk):
            yield self.odd[start : start + chunk]
        left = np.flatnonzero(self.state != MATCHED)
        for start in range(0, len(left), chunk):
            at = left[start : start + chunk]
            packed = np.empty(len(at), dtype=DIGEST)
            packed["hi"], packed["lo"] = self.hi[at], self.lo[at]
            raw = packed.tobytes()
            yield [raw[i : i + SIZE].hex() for i in range(0, len(raw), SIZE)]
