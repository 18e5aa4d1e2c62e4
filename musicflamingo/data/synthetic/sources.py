"""Note material for clips: generated chord progressions with a melody, and Bach chorales from music21's corpus.

Both produce :class:`Note` lists in quarter-note beats (tempo-free); the renderer turns beats into seconds.
Chorales are parsed once per process (``lru_cache``) and only kept when their key is unambiguous: the
Krumhansl-Schmuckler key (music21's default ``analyze('key')``: Aarden-Essen weights) of the whole piece equals
that of its first four bars and agrees with the key signature, so "the key of the excerpt" is a fact and not a
guess.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from musicflamingo.data.synthetic.theory import (
    MAJOR_PROGRESSIONS,
    MINOR_PROGRESSIONS,
    Key,
    beats_per_bar,
    chord_pitch_classes,
    progression_name,
)


@dataclass(frozen=True)
class Note:
    """One note: onset and duration in quarter-note beats, MIDI pitch, MIDI velocity (1-127)."""

    onset: float
    duration: float
    pitch: int
    velocity: int


def _place(pc: int, low: int) -> int:
    """Lowest MIDI pitch >= ``low`` with pitch class ``pc``."""
    return low + (pc - low) % 12


def generate_progression_piece(
    key: Key, time_signature: str, n_beats: float, rng: np.random.Generator
) -> tuple[list[Note], str]:
    """A chord progression (one chord per bar) with bass, accompaniment on every beat and a melody.

    The metre is audible: the bass and the loudest chord fall on beat 1 of each bar, the other beats are
    softer. Every beat has an onset and the melody moves in whole beats only, so the beat is the fastest
    regular pulse and the onset rate equals the tempo.

    Returns:
        (notes, the chords actually played, e.g. "I-IV-I-V-I").
    """
    bpb = beats_per_bar(time_signature)
    progs = MAJOR_PROGRESSIONS if key.mode == "major" else MINOR_PROGRESSIONS
    degrees = progs[int(rng.integers(len(progs)))]
    style = ("block", "arpeggio")[int(rng.integers(2))]
    n_bars = math.ceil(n_beats / bpb)
    notes: list[Note] = []

    def vel(base: int) -> int:
        return int(np.clip(base + rng.integers(-4, 5), 1, 127))

    scale = list(key.scale)
    # Melody state: index into a two-octave scale ladder starting at the tonic above G4.
    ladder = [_place(scale[i % 7], 67) + 12 * (i // 7) for i in range(14)]
    ladder = sorted(ladder)
    mel_idx = int(np.argmin([abs(p - _place(key.tonic_pc, 67)) for p in ladder]))
    # Start on the tonic, then the progression, and always end with a V-I cadence (I-I for two bars).
    plan = [degrees[bar % len(degrees)] for bar in range(n_bars)]
    plan[-1] = 0
    if n_bars >= 3:
        plan[-2] = 4
    for bar, degree in enumerate(plan):
        root, third, fifth = chord_pitch_classes(key, degree)
        t0 = float(bar * bpb)
        bass = _place(root, 40)
        chord = sorted(_place(pc, 55) for pc in (root, third, fifth))
        notes.append(Note(t0, min(2.0, float(bpb)), bass, vel(92)))
        for beat in range(bpb):
            strong = beat == 0
            if style == "block" or strong:
                for p in chord:
                    notes.append(Note(t0 + beat, 0.6, p, vel(82 if strong else 72)))
            else:
                p = chord[(beat - 1) % 3] + (12 if beat % 2 == 0 else 0)
                notes.append(Note(t0 + beat, 0.6, p, vel(74)))
        # Melody: durations of 1 or 2 beats filling the bar; a chord tone on beat 1, steps in between.
        beat = 0
        while beat < bpb:
            dur = 2 if (bpb - beat >= 2 and rng.random() < 0.35) else 1
            if beat == 0:
                chord_pcs = {root, third, fifth}
                cands = [i for i, p in enumerate(ladder) if p % 12 in chord_pcs]
                mel_idx = min(cands, key=lambda i: (abs(i - mel_idx), i))
            else:
                mel_idx = int(np.clip(mel_idx + rng.choice([-2, -1, -1, 1, 1, 2]), 0, len(ladder) - 1))
            pitch = ladder[mel_idx]
            if key.mode == "minor" and degree == 4 and pitch % 12 == (key.tonic_pc + 10) % 12:
                pitch += 1  # leading tone over the dominant
            notes.append(Note(t0 + beat, float(dur), pitch, vel(88 if beat == 0 else 80)))
            beat += dur
    return [n for n in notes if n.onset < n_beats], progression_name(key, tuple(plan))


@dataclass(frozen=True)
class Chorale:
    """A four-part chorale reduced to notes. ``key`` is the original key; transpose notes to move it."""

    source_id: str  # e.g. "bach/bwv269"
    title: str
    key: Key
    time_signature: str
    notes: tuple[Note, ...]
    length_beats: float


def _music21():
    try:
        import music21
    except ImportError as e:  # pragma: no cover - music21 is a runtime requirement
        raise ImportError("the chorale source needs music21 (pip install 'music21>=9.1')") from e
    return music21


# music21's default key analysis (``Stream.analyze('key')`` runs ``analysis.discrete.AardenEssen``, whatever its
# docstring says): Krumhansl-Schmuckler correlation with the Aarden-Essen profiles, tonic first.
_KEY_PROFILES = {
    "major": (
        17.7661,
        0.145624,
        14.9265,
        0.160186,
        19.8049,
        11.3587,
        0.291248,
        22.062,
        0.145624,
        8.15494,
        0.232998,
        4.95122,
    ),
    "minor": (
        18.2648,
        0.737619,
        14.0499,
        16.8599,
        0.702494,
        14.4362,
        0.702494,
        18.6161,
        4.56621,
        1.93186,
        7.37619,
        1.75623,
    ),
}


def _centred_profiles() -> dict[str, tuple[np.ndarray, list[float]]]:
    """Per mode: row i is the profile rotated to tonic i minus its mean; and the row's sum of squares. Both
    computed in music21's order (Python floats, left to right) so that the correlations match bit for bit."""
    out = {}
    for mode, w in _KEY_PROFILES.items():
        mean = sum(w) / len(w)
        rows = [[w[(j - i) % 12] - mean for j in range(12)] for i in range(12)]
        sq = []
        for row in rows:
            acc = 0.0
            for x in row:
                acc = acc + x**2
            sq.append(acc)
        out[mode] = (np.array(rows, dtype=np.float64), sq)
    return out


_CENTRED_PROFILES = _centred_profiles()


def pitch_class_durations(notes) -> list:
    """Quarter lengths summed per pitch class (a chord counts once per pitch) over music21 notes/chords, as
    music21's key analysis does (same order, same number types)."""
    dist: list = [0] * 12
    for n in notes:
        length = n.quarterLength
        for p in n.pitches:
            dist[p.pitchClass] += length
    return dist


def estimate_key(durations) -> tuple[Key, float]:
    """The key music21's ``analyze('key')`` returns for a stream with these pitch-class durations, and its
    correlation coefficient, without building music21's 24 Key objects (the slow part of loading a chorale).

    Pearson correlation of the durations with each rotated profile; the best (correlation, tonic pitch class,
    mode) wins, so ties go to the higher pitch class, then to minor, as in music21's sorted candidate list.
    """
    if len(durations) != 12:
        raise ValueError(f"estimate_key: expected 12 pitch-class durations, got {len(durations)}")
    if not any(durations):
        raise ValueError("estimate_key: no pitched note with a duration to find a key from")
    mean = sum(durations) / len(durations)
    dev = [d - mean for d in durations]
    dev_sq = 0.0
    for d in dev:
        dev_sq = dev_sq + d**2
    dev_arr = np.array([float(d) for d in dev], dtype=np.float64)
    best = None
    for mode, (rows, row_sq) in _CENTRED_PROFILES.items():
        # cumsum adds left to right like music21's loop (np.sum would add pairwise and round differently)
        tops = np.cumsum(rows * dev_arr, axis=1)[:, -1]
        for pc in range(12):
            r = 0.0 if row_sq[pc] == 0 or dev_sq == 0 else float(tops[pc]) / (row_sq[pc] * dev_sq) ** 0.5
            if best is None or (r, pc, mode) > best:
                best = (r, pc, mode)
    r, pc, mode = best
    return Key(pc, mode), r


def _key_of(notes) -> Key:
    return estimate_key(pitch_class_durations(notes))[0]


@functools.cache
def load_chorale(path: str) -> Chorale | None:
    """Parse a chorale from music21's corpus; ``None`` when it is not a plain 4-part chorale in 3/4 or 4/4
    with an unambiguous key. Cached: each file is parsed at most once per process."""
    m21 = _music21()
    score = m21.corpus.parse(path)
    if len(score.parts) != 4:
        return None
    sigs = {ts.ratioString for ts in score.recurse().getElementsByClass(m21.meter.TimeSignature)}
    if len(sigs) != 1 or next(iter(sigs)) not in ("3/4", "4/4"):
        return None
    time_signature = next(iter(sigs))
    bpb = beats_per_bar(time_signature)
    key_sigs = list(score.recurse().getElementsByClass(m21.key.KeySignature))
    # the same notes, in the same order, as score.analyze("key") and opening.analyze("key") weigh
    flat = score.flatten()
    opening = flat.notes.getElementsByOffset(0, 4 * bpb, includeEndBoundary=False)
    key = _key_of(n for n in flat.notes if not isinstance(n, m21.note.Unpitched))
    if _key_of(n for n in opening if not isinstance(n, m21.note.Unpitched)) != key:
        return None
    if not key_sigs or key.mode not in ("major", "minor") or key_sigs[0].sharps % 12 != key.fifths % 12:
        return None
    pickup = 0.0
    first_measure = score.parts[0].getElementsByClass(m21.stream.Measure)[0]
    if first_measure.paddingLeft:
        pickup = float(first_measure.paddingLeft)
    notes: list[Note] = []
    for voice, part in enumerate(score.parts):
        part.stripTies(inPlace=True)  # the score is this call's own: a copy (the slowest step) is not needed
        for n in part.flatten().notes:
            onset = float(n.offset)
            downbeat = abs(((onset + pickup) / bpb) - round((onset + pickup) / bpb)) < 1e-6
            base = (92 if downbeat else 74) + (6 if voice == 0 else 0)
            for p in n.pitches:
                notes.append(Note(onset, float(n.quarterLength), int(p.midi), base))
    name = str(path).rsplit("/", 1)[-1].split(".mxl")[0]
    title = f"BWV {name[3:]}" if name.startswith("bwv") else name
    return Chorale(
        source_id=f"bach/{name}",
        title=str(title),
        key=key,
        time_signature=time_signature,
        notes=tuple(sorted(notes, key=lambda n: (n.onset, n.pitch))),
        length_beats=float(score.highestTime),
    )


def chorale_paths() -> list[str]:
    """Sorted paths of the Bach pieces bundled with music21 (offline). Listed once per process: the bundled core
    corpus cannot change while it runs (~0.4 s a listing); each caller gets a list of its own."""
    return list(_bach_paths())


@functools.cache
def _bach_paths() -> tuple[str, ...]:
    m21 = _music21()
    return tuple(sorted(str(p) for p in m21.corpus.getComposer("bach")))


def chorale_excerpt(
    chorale: Chorale, target: Key, n_beats: float, rng: np.random.Generator
) -> tuple[list[Note], int]:
    """The first ``n_beats`` of a chorale transposed to ``target`` (same mode), looping if it is short.

    Returns:
        (notes, semitones transposed).
    """
    if target.mode != chorale.key.mode:
        raise ValueError(f"cannot move {chorale.source_id} in {chorale.key.name} to {target.name}")
    shift = (target.tonic_pc - chorale.key.tonic_pc) % 12
    if shift > 6:
        shift -= 12
    notes: list[Note] = []
    start = 0.0
    while start < n_beats:
        for n in chorale.notes:
            if start + n.onset >= n_beats:
                break
            v = int(np.clip(n.velocity + rng.integers(-4, 5), 1, 127))
            notes.append(Note(start + n.onset, n.duration, n.pitch + shift, v))
        start += chorale.length_beats
    return notes, shift
