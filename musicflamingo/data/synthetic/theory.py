"""Music-theory tables for the synthetic corpus: keys, tempo buckets, time signatures, General MIDI instruments.

Everything here is plain data plus small pure functions, so the ground truth of a clip (key, tempo, metre,
instrument) and the multiple-choice distractors come from one place. The answer sets are chosen so that the
questions are learnable from audio: tempi come from well separated buckets, instrument families sound very
different, and key distractors never share the key signature of the answer (a relative major/minor would have
the same pitch set and is left out on purpose).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Spelling of the tonic per mode: the conventional key names (Db major, but C# minor).
MAJOR_TONIC_NAMES = ("C", "Db", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
MINOR_TONIC_NAMES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "G#", "A", "Bb", "B")
MODES = ("major", "minor")

MAJOR_SCALE = (0, 2, 4, 5, 7, 9, 11)
NATURAL_MINOR_SCALE = (0, 2, 3, 5, 7, 8, 10)

# Beats per minute of a quarter note. Ratios >= 1.33 between neighbours, so an onset rate tells them apart.
TEMPO_BUCKETS = (60, 90, 120, 160)
# Every time signature here counts quarter-note beats, so "BPM" means the same thing for all of them.
TIME_SIGNATURES = ("2/4", "3/4", "4/4", "5/4")

# The 16 General MIDI families, in program order (8 programs each).
GM_FAMILIES = (
    "Piano",
    "Chromatic Percussion",
    "Organ",
    "Guitar",
    "Bass",
    "Strings",
    "Ensemble",
    "Brass",
    "Reed",
    "Pipe",
    "Synth Lead",
    "Synth Pad",
    "Synth Effects",
    "Ethnic",
    "Percussive",
    "Sound Effects",
)

# The solo instruments used for clips: General MIDI program -> name. Families with clearly different timbres
# (struck, mallet, sustained organ, plucked, bowed, brass, reed, flute, synth); bass/pad/effects are left out.
INSTRUMENTS: dict[int, str] = {
    0: "Acoustic Grand Piano",
    1: "Bright Acoustic Piano",
    11: "Vibraphone",
    12: "Marimba",
    16: "Drawbar Organ",
    19: "Church Organ",
    24: "Acoustic Guitar (nylon)",
    25: "Acoustic Guitar (steel)",
    40: "Violin",
    42: "Cello",
    56: "Trumpet",
    57: "Trombone",
    65: "Alto Sax",
    71: "Clarinet",
    73: "Flute",
    74: "Recorder",
    80: "Lead 1 (square)",
    81: "Lead 2 (sawtooth)",
}

# How captions name each instrument (lower case, reads well after "a solo").
INSTRUMENT_LABELS: dict[int, str] = {
    0: "acoustic grand piano",
    1: "bright acoustic piano",
    11: "vibraphone",
    12: "marimba",
    16: "drawbar organ",
    19: "church organ",
    24: "nylon-string acoustic guitar",
    25: "steel-string acoustic guitar",
    40: "violin",
    42: "cello",
    56: "trumpet",
    57: "trombone",
    65: "alto saxophone",
    71: "clarinet",
    73: "flute",
    74: "recorder",
    80: "square-wave synth lead",
    81: "sawtooth synth lead",
}

# Octave shift per family so that each instrument plays near its natural register (a flute has no bass notes).
FAMILY_TRANSPOSE = {"Pipe": 12}


def program_family(program: int) -> str:
    """General MIDI family name of a program number (0-127)."""
    if not 0 <= program <= 127:
        raise ValueError(f"General MIDI program must be in 0..127, got {program}")
    return GM_FAMILIES[program // 8]


INSTRUMENT_FAMILIES = tuple(dict.fromkeys(program_family(p) for p in INSTRUMENTS))


@dataclass(frozen=True)
class Key:
    """A musical key: tonic pitch class (0 = C) and mode ("major" or "minor")."""

    tonic_pc: int
    mode: str

    def __post_init__(self) -> None:
        if not 0 <= self.tonic_pc <= 11:
            raise ValueError(f"tonic pitch class must be in 0..11, got {self.tonic_pc}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")

    @property
    def tonic(self) -> str:
        names = MAJOR_TONIC_NAMES if self.mode == "major" else MINOR_TONIC_NAMES
        return names[self.tonic_pc]

    @property
    def name(self) -> str:
        """E.g. "F# minor"."""
        return f"{self.tonic} {self.mode}"

    @property
    def scale(self) -> tuple[int, ...]:
        """Pitch classes of the (natural) scale, tonic first."""
        steps = MAJOR_SCALE if self.mode == "major" else NATURAL_MINOR_SCALE
        return tuple((self.tonic_pc + s) % 12 for s in steps)

    @property
    def triad(self) -> tuple[int, int, int]:
        """Pitch classes of the tonic triad (tonic, third, fifth)."""
        third = 4 if self.mode == "major" else 3
        return (self.tonic_pc, (self.tonic_pc + third) % 12, (self.tonic_pc + 7) % 12)

    @property
    def fifths(self) -> int:
        """Position on the circle of fifths of the key signature: sharps > 0, flats < 0 (in -5..6)."""
        major_pc = self.tonic_pc if self.mode == "major" else (self.tonic_pc + 3) % 12
        f = (major_pc * 7) % 12  # C=0, G=1, D=2, ... F=11
        return f - 12 if f > 6 else f

    def midi_key_signature(self) -> str:
        """Key name as mido's ``key_signature`` meta message spells it ("Bb", "F#m")."""
        return self.tonic + ("m" if self.mode == "minor" else "")

    @classmethod
    def parse(cls, name: str) -> Key:
        """Inverse of :attr:`name` ("Eb major" -> Key(3, "major"))."""
        try:
            tonic, mode = name.split()
            names = MAJOR_TONIC_NAMES if mode == "major" else MINOR_TONIC_NAMES
            return cls(names.index(tonic), mode)
        except ValueError as e:
            raise ValueError(f"not a key name like 'Eb major' or 'C# minor': {name!r}") from e


def _signature_distance(a: Key, b: Key) -> int:
    d = abs(a.fifths - b.fifths) % 12
    return min(d, 12 - d)


def key_distractors(key: Key, rng: np.random.Generator, n: int = 3) -> list[Key]:
    """Wrong answers for a key question: the parallel key (same tonic, other mode: tests the mode) and keys of
    other tonics (one each) whose signature is at least two fifths from both the key and its parallel (tests the
    tonic). Never the relative key, which has the same notes and cannot be told apart reliably from a few seconds
    of audio.

    The options alone then leave exactly two candidates, the key and its parallel (0.50 without the audio): far
    keys drawn only from the key's side could sit one fifth from the parallel, which ruled the parallel out and gave
    the answer away (74 % of questions answerable from the options, half of them for certain)."""
    parallel = Key(key.tonic_pc, "minor" if key.mode == "major" else "major")
    pool = [
        Key(pc, mode)
        for pc in range(12)
        for mode in MODES
        if pc != key.tonic_pc
        and _signature_distance(key, Key(pc, mode)) >= 2
        and _signature_distance(parallel, Key(pc, mode)) >= 2
    ]
    picks: list[Key] = []
    for i in rng.permutation(len(pool)):
        if len(picks) == n - 1:
            break
        if all(pool[int(i)].tonic_pc != k.tonic_pc for k in picks):  # no second parallel pair among the options
            picks.append(pool[int(i)])
    return [parallel] + picks


def beats_per_bar(time_signature: str) -> int:
    """Quarter-note beats per bar of one of :data:`TIME_SIGNATURES`."""
    num, den = time_signature.split("/")
    if den != "4":
        raise ValueError(f"only x/4 time signatures are supported, got {time_signature!r}")
    return int(num)


# Chord progressions by scale degree (0 = tonic), one chord per bar. The tonic chord returns every other bar
# so that the key of even a two-bar clip is clear; minor keys use the major dominant (harmonic minor).
MAJOR_PROGRESSIONS = ((0, 3, 0, 4), (0, 4, 0, 3), (0, 1, 4, 0), (0, 5, 0, 4), (0, 3, 4, 0))
MINOR_PROGRESSIONS = ((0, 3, 0, 4), (0, 4, 0, 3), (0, 1, 4, 0), (0, 5, 0, 4), (0, 3, 4, 0))
ROMAN_MAJOR = ("I", "ii", "iii", "IV", "V", "vi", "vii°")
ROMAN_MINOR = ("i", "ii°", "III", "iv", "V", "VI", "VII")


def chord_pitch_classes(key: Key, degree: int) -> tuple[int, int, int]:
    """Root, third and fifth pitch classes of the diatonic triad on ``degree``; V is major in minor keys."""
    scale = key.scale
    pcs = [scale[(degree + 2 * i) % 7] for i in range(3)]
    if key.mode == "minor" and degree == 4:
        pcs[1] = (pcs[1] + 1) % 12  # raised leading tone
    return (pcs[0], pcs[1], pcs[2])


def progression_name(key: Key, degrees: tuple[int, ...]) -> str:
    romans = ROMAN_MAJOR if key.mode == "major" else ROMAN_MINOR
    return "-".join(romans[d] for d in degrees)
