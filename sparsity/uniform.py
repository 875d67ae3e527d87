"""``torch.rand`` on a CPU generator, float32, drawn by a compiled copy of torch's own Mersenne Twister.

Why: masked decay's MVUE weight gradient draws two uniforms per group of 4 of every layer's ``dYᵀ`` in
every step (`mvue.mvue24`): on the GPT about 2.4 million a step, 7 ms of a 60 ms step through
``torch.rand``, whose CPU kernel makes each number in a serial per-element call (about 3 ns each here).
The same numbers come out of a numba loop at about 0.25 ns each.

What torch does (``ATen/core/MT19937RNGEngine.h``, ``ATen/core/TransformationHelper.h``,
``ATen/native/cpu/DistributionTemplates.h``): a float32 uniform in [0, 1) is the low 24 bits of one
tempered 32-bit MT19937 output times 2^-24 (exact in float32, never 1, so torch's clamp of 1 to 0 never
acts), the numbers filling the tensor in its row-major order. The engine keeps ``left`` and ``next``: a
draw first decrements ``left`` and regenerates the 624 words when it reaches 0, then tempers word
``next``. `uniforms` reads that state from ``generator.get_state()``, draws, and writes the state back
with ``set_state``: the generator ends where ``torch.rand`` would have left it, and the numbers are
``torch.rand``'s, bit for bit.

The state's byte layout (torch's ``CPUGeneratorImplState``: the seed, ``left``, ``seeded``, ``next``, the
624 words each widened to 64 bits, then the cached normal samples, which a uniform draw leaves alone) is
not a public interface, so it is checked, not assumed: the first call draws a few lengths both ways from
a scratch generator and compares numbers and end states. Where they differ (another torch, another
layout), or numba is missing, `uniforms` returns None and the caller draws with ``torch.rand``.

Draws here hold a lock of their own from reading the state to writing it back; unlike ``torch.rand``
they do not hold the generator's internal mutex, so another thread drawing from the same generator with
torch at the same moment is not ordered against them (masked decay draws from its own generator, in the
backward pass, one layer after another).
"""

from __future__ import annotations

import functools
import threading

import numpy as np
import torch

try:
    from numba import njit
except ImportError:  # pragma: no cover - numba is a dependency; without it torch.rand serves
    njit = None

_WORDS, _SHIFT = 624, 397                       # MT19937's N and M
_STATE_BYTES = 5056                             # sizeof(CPUGeneratorImplState) in this torch
_LEFT, _NEXT, _STATE = slice(8, 12), slice(16, 24), slice(24, 24 + 8 * _WORDS)     # byte offsets in it
# Reading, advancing and writing back a generator's state is one step, as torch.rand's own draw holds the
# generator's mutex: two threads drawing here from one generator would otherwise draw the same numbers.
_LOCK = threading.Lock()

if njit is not None:

    @njit(cache=True, nogil=True)
    def _regenerate(s):
        """The engine's ``next_state``: the 624 words twisted in place (branch-free: a word's low bit
        selects MATRIX_A through a mask)."""
        upper, lower, one, zero, a = (np.uint32(0x80000000), np.uint32(0x7FFFFFFF), np.uint32(1), np.uint32(0),
                                      np.uint32(0x9908B0DF))
        for j in range(_WORDS - _SHIFT):
            y = (s[j] & upper) | (s[j + 1] & lower)
            s[j] = s[j + _SHIFT] ^ (y >> one) ^ ((zero - (s[j + 1] & one)) & a)
        for j in range(_WORDS - _SHIFT, _WORDS - 1):
            y = (s[j] & upper) | (s[j + 1] & lower)
            s[j] = s[j + _SHIFT - _WORDS] ^ (y >> one) ^ ((zero - (s[j + 1] & one)) & a)
        y = (s[_WORDS - 1] & upper) | (s[0] & lower)
        s[_WORDS - 1] = s[_SHIFT - 1] ^ (y >> one) ^ ((zero - (s[0] & one)) & a)

    @njit(cache=True, nogil=True)
    def _fill(s, next_, left, out):
        """``out[:]`` = the engine's next ``len(out)`` float32 uniforms; returns the new (next, left).

        Between regenerations the engine has ``left - 1`` words ready from ``next`` on; those are tempered in
        one loop (so that it vectorises) before the next regeneration."""
        scale, low = np.float32(1.0 / 16777216.0), np.uint32(0xFFFFFF)
        i, n = 0, out.shape[0]
        while i < n:
            if left == 1:
                _regenerate(s)
                next_, left = 0, _WORDS + 1     # the draw that follows leaves left = 624, next = 1, as torch's
            k = min(left - 1, n - i)
            words, into = s[next_:next_ + k], out[i:i + k]      # slices: indexed with offsets it ran 4.6x slower
            for j in range(k):
                y = words[j]
                y ^= y >> np.uint32(11)
                y ^= (y << np.uint32(7)) & np.uint32(0x9D2C5680)
                y ^= (y << np.uint32(15)) & np.uint32(0xEFC60000)
                y ^= y >> np.uint32(18)
                into[j] = np.float32(np.int32(y & low)) * scale        # 24 bits: exact; as int32 it vectorises
            i, next_, left = i + k, next_ + k, left - k
        return next_, left


def _draw(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor | None:
    with _LOCK:
        state = generator.get_state()
        raw = state.numpy()
        if raw.size != _STATE_BYTES:
            return None
        left, next_ = int(raw[_LEFT].view(np.int32)[0]), int(raw[_NEXT].view(np.uint64)[0])
        if not (0 < left <= _WORDS and next_ <= _WORDS):
            return None
        words = raw[_STATE].view(np.uint64).astype(np.uint32)
        out = torch.empty(shape, dtype=torch.float32)
        next_, left = _fill(words, next_, left, out.view(-1).numpy())
        raw[_STATE].view(np.uint64)[:] = words
        raw[_NEXT].view(np.uint64)[0] = next_
        raw[_LEFT].view(np.int32)[0] = left
        generator.set_state(state)
        return out


@functools.lru_cache(maxsize=None)
def _agrees() -> bool:
    """Whether `_draw` gives ``torch.rand``'s numbers and end state in this torch: a few lengths from a
    scratch generator, across the 624-word regenerations and from a part-used state."""
    if njit is None:
        return False
    ours, theirs = torch.Generator().manual_seed(20211), torch.Generator().manual_seed(20211)
    for n in (1, 622, 624, 625, 1250, 3):
        got = _draw((n,), ours)
        if got is None or not torch.equal(got, torch.rand(n, generator=theirs)):
            return False
    return torch.equal(ours.get_state(), theirs.get_state())


def uniforms(shape: tuple[int, ...], generator: torch.Generator | None = None) -> torch.Tensor | None:
    """``torch.rand(shape, generator=generator)`` in float32 on the CPU, the same numbers and the same end
    state of ``generator`` (None: torch's default CPU generator), drawn by the compiled engine; None where it
    does not serve (a generator not on the CPU, or this torch's engine not the one checked), and then the
    generator is untouched."""
    generator = torch.default_generator if generator is None else generator
    if generator.device.type != "cpu" or not _agrees():
        return None
    return _draw(tuple(shape), generator)
