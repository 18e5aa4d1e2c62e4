"""MIDI writing and FluidSynth rendering.

FluidSynth's command line spends ~0.3 s per call loading the 140 MB soundfont, longer than rendering a 10 s
clip takes, so clips are rendered in batches: one MIDI file holds many clips one after another (each on its own
channel, separated by silence, ended by "all sound off"), one ``fluidsynth`` call renders it, and the long
waveform is cut back into clips at the sample positions we placed them. The batch file runs at a fixed MIDI
tempo of 1 tick = 1 ms; each clip's own tempo is already in its note times. A per-clip MIDI file with the real
tempo, metre, key and program metadata is written next to the audio for inspection.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from musicflamingo.data.synthetic.sources import Note
from musicflamingo.data.synthetic.theory import Key

DEFAULT_SOUNDFONT = "/usr/share/sounds/sf2/FluidR3_GM.sf2"
_CHANNELS = tuple(c for c in range(16) if c != 9)  # channel 10 (index 9) is the GM drum kit
_GAP_S = 0.5  # silence between clips in a batch; voices are already cut by "all sound off"
_LEAD_S = 0.1  # room for the program change before a clip's first note
_FADE_S = 0.03


class SynthesizerNotFoundError(RuntimeError):
    """FluidSynth or its General MIDI soundfont is not installed."""


@dataclass(frozen=True)
class Performance:
    """What to render for one clip: notes in beats, tempo, General MIDI program and clip length in seconds."""

    notes: tuple[Note, ...]
    bpm: float
    program: int
    duration: float

    def timed_notes(self) -> list[tuple[float, float, int, int]]:
        """Notes as (start s, end s, pitch, velocity), cut at the clip end, slightly detached (-30 ms) so that
        repeated notes are heard as new onsets."""
        spb = 60.0 / self.bpm
        out = []
        for n in self.notes:
            start = n.onset * spb
            end = min(start + max(n.duration * spb - 0.03, 0.02), self.duration)
            if start < self.duration and end > start:
                out.append((start, end, int(np.clip(n.pitch, 0, 127)), n.velocity))
        return out


def find_fluidsynth() -> str:
    """Path of the ``fluidsynth`` executable, or a clear error naming the Debian package."""
    exe = shutil.which("fluidsynth")
    if exe is None:
        raise SynthesizerNotFoundError(
            "the synthetic corpus renders MIDI with the `fluidsynth` command, which is not on PATH: "
            "install the Debian package `fluidsynth` (apt-get install fluidsynth fluid-soundfont-gm)"
        )
    return exe


def check_soundfont(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise SynthesizerNotFoundError(
            f"General MIDI soundfont not found at {path}: install the Debian package `fluid-soundfont-gm` "
            "(apt-get install fluid-soundfont-gm) or pass soundfont=<path to a .sf2>"
        )
    return path


def write_clip_midi(
    path: str | Path, perf: Performance, time_signature: str, key: Key, ticks_per_beat: int = 480
) -> None:
    """Write one clip as a standard MIDI file with its tempo, time signature, key and program."""
    import mido

    num, den = (int(x) for x in time_signature.split("/"))
    track = mido.MidiTrack()
    track.append(mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(perf.bpm), time=0))
    track.append(mido.MetaMessage("time_signature", numerator=num, denominator=den, time=0))
    track.append(mido.MetaMessage("key_signature", key=key.midi_key_signature(), time=0))
    track.append(mido.Message("program_change", program=perf.program, channel=0, time=0))
    tps = ticks_per_beat * perf.bpm / 60.0
    events = []
    for start, end, pitch, vel in perf.timed_notes():
        events.append((round(start * tps), 1, pitch, vel))
        events.append((round(end * tps), 0, pitch, 0))
    _append_events(track, events, channel=0, now=0)
    mid = mido.MidiFile(ticks_per_beat=ticks_per_beat)
    mid.tracks.append(track)
    mid.save(str(path))


def _append_events(track, events: list[tuple[int, int, int, int]], channel: int, now: int) -> int:
    """Append (tick, is_on, pitch, velocity) events as delta-timed messages; offs sort before ons."""
    import mido

    for tick, is_on, pitch, vel in sorted(events):
        kind = "note_on" if is_on else "note_off"
        track.append(mido.Message(kind, note=pitch, velocity=vel, channel=channel, time=tick - now))
        now = tick
    return now


def _write_batch_midi(path: Path, perfs: list[Performance]) -> list[int]:
    """One MIDI file with all clips in sequence at 1 tick = 1 ms. Returns each clip's start in ms."""
    import mido

    track = mido.MidiTrack()
    track.append(mido.MetaMessage("set_tempo", tempo=1000 * 480, time=0))  # 480 ticks/beat -> 1 ms/tick
    now, cursor, starts = 0, round(_LEAD_S * 1000), []
    for i, perf in enumerate(perfs):
        ch = _CHANNELS[i % len(_CHANNELS)]
        track.append(mido.Message("program_change", program=perf.program, channel=ch, time=cursor - 50 - now))
        now = cursor - 50
        events = []
        for start, end, pitch, vel in perf.timed_notes():
            events.append((cursor + round(start * 1000), 1, pitch, vel))
            events.append((cursor + round(end * 1000), 0, pitch, 0))
        now = _append_events(track, events, ch, now)
        end_tick = cursor + round(perf.duration * 1000)
        track.append(mido.Message("control_change", control=120, value=0, channel=ch, time=end_tick - now))
        now = end_tick
        starts.append(cursor)
        cursor = end_tick + round(_GAP_S * 1000)
    track.append(mido.MetaMessage("end_of_track", time=cursor - now))
    mid = mido.MidiFile(ticks_per_beat=480)
    mid.tracks.append(track)
    mid.save(str(path))
    return starts


def render_batch(
    perfs: list[Performance],
    work_dir: str | Path,
    *,
    soundfont: str | Path = DEFAULT_SOUNDFONT,
    sampling_rate: int = 16000,
    render_rate: int = 32000,
    gain: float = 0.5,
) -> list[np.ndarray]:
    """Render clips with one ``fluidsynth`` call.

    FluidSynth runs at ``render_rate`` (no reverb or chorus, float samples, so nothing clips) and the result
    is resampled to ``sampling_rate`` with soxr: rendering straight at 16 kHz would alias the soundfont's
    44.1 kHz samples. Each clip is peak-normalised to 0.9 and faded out over its last 30 ms.

    Returns:
        One float32 array per clip, shape ``(round(duration * sampling_rate),)``, mono.
    """
    import soundfile as sf
    import soxr

    exe = find_fluidsynth()
    sf2 = check_soundfont(soundfont)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    mid_path, wav_path = work_dir / "batch.mid", work_dir / "batch.wav"
    starts_ms = _write_batch_midi(mid_path, perfs)
    cmd = [exe, "-ni", "-q", "-R", "0", "-C", "0", "-g", str(gain), "-r", str(render_rate)]
    cmd += ["-O", "float", "-T", "wav", "-F", str(wav_path), str(sf2), str(mid_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not wav_path.is_file():
        raise RuntimeError(f"fluidsynth failed ({' '.join(cmd)}): {proc.stderr.strip()[-2000:]}")
    audio, sr = sf.read(str(wav_path), dtype="float32", always_2d=True)  # (T, 2)
    mono = audio.mean(axis=1)
    if sr != sampling_rate:
        mono = soxr.resample(mono, sr, sampling_rate, quality="HQ").astype(np.float32)
    mid_path.unlink()
    wav_path.unlink()
    clips = []
    fade = np.linspace(1.0, 0.0, int(_FADE_S * sampling_rate), dtype=np.float32)
    for start_ms, perf in zip(starts_ms, perfs):
        start = round(start_ms * sampling_rate / 1000)
        n = round(perf.duration * sampling_rate)
        clip = np.zeros(n, dtype=np.float32)
        seg = mono[start : start + n]
        clip[: len(seg)] = seg
        clip[-len(fade) :] *= fade
        peak = float(np.abs(clip).max())
        if peak > 0:
            clip *= 0.9 / peak
        clips.append(clip)
    return clips
