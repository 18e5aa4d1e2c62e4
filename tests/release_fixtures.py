"""Benchmark release folders for tests: the metadata files of ``tests/release_data/`` (rows taken from the public
releases, see its README.md) copied into a temporary folder in the release's own layout, with short generated
audio written at every path the rows name.

Import from tests as ``from release_fixtures import ...``. Each ``make_<benchmark>(root)`` returns the release
folder to pass as ``benchmark.root``; ``RELEASES`` maps a config name to its builder.
"""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Callable
from pathlib import Path

from tiny_assets import make_tone, write_audio

DATA = Path(__file__).resolve().parent / "release_data"


def tone(path: Path, seconds: float = 0.05, freq: float = 440.0) -> Path:
    """A short sine at ``path`` (format from the suffix: wav, au, mp3, ...)."""
    return write_audio(path, make_tone(freq, seconds))


def _copy(name: str, root: Path) -> Path:
    shutil.copytree(DATA / name, root, dirs_exist_ok=True)
    return root


def make_mmau(root: Path) -> Path:
    """mmau-test-mini.json (6 real rows, 2 with a repeated option) + test-mini-audios/<id>.wav."""
    _copy("mmau", root)
    for rec in json.loads((root / "mmau-test-mini.json").read_text(encoding="utf-8")):
        tone(root / rec["audio_id"])
    return root


def make_mmar(root: Path, version: str = "jsonl") -> Path:
    """MMAR-meta.jsonl (current, with rubrics) or MMAR-meta.json (before Feb 2026, with 3 answers that are not
    among the choices), 5 real rows, + audio/<id>.wav."""
    _copy("mmar", root)
    keep = root / ("MMAR-meta.jsonl" if version == "jsonl" else "MMAR-meta.json")
    (root / ("MMAR-meta.json" if version == "jsonl" else "MMAR-meta.jsonl")).unlink()
    text = keep.read_text(encoding="utf-8")
    rows = (
        json.loads(text) if version == "json" else [json.loads(ln) for ln in text.splitlines() if ln.strip()]
    )
    for rec in rows:
        tone(root / rec["audio_path"])
    return root


def make_mmau_pro(root: Path) -> Path:
    """test.parquet (written with pyarrow from test.rows.json) + data/<uuid>.wav for every audio_path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = json.loads((DATA / "mmau_pro" / "test.rows.json").read_text(encoding="utf-8"))
    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "test.parquet")
    for rec in rows:
        for p in rec["audio_path"]:
            tone(root / p)
    return root


def make_muchomusic(root: Path, downloader_names: bool = False) -> Path:
    """muchomusic.csv + sdd/audio/<nn>/<id>.2min.mp3 (<nn>: the id's last two digits, as SDD ships them) +
    musiccaps/audio/[<ytid>]-[<start>-<end>].wav (or, with ``downloader_names``, MuChoMusic's download.py naming
    <ytid>_<start>.wav)."""
    _copy("muchomusic", root)
    with (root / "muchomusic.csv").open(newline="", encoding="utf-8") as f:
        for rec in csv.DictReader(f):
            ident = rec["dataset_identifier"]
            if rec["dataset"] == "sdd":
                tone(root / "sdd" / "audio" / ident[-2:] / f"{ident}.2min.mp3")
            else:
                ytid, _, start = ident.rpartition("_")
                name = f"{ident}.wav" if downloader_names else f"[{ytid}]-[{start}-{int(start) + 10}].wav"
                tone(root / "musiccaps" / "audio" / name)
    return root


def make_musiccaps(root: Path) -> Path:
    """musiccaps-public.csv (5 real rows, CRLF, two captions with line breaks) + audio/[<ytid>]-[<s>-<e>].wav."""
    _copy("musiccaps", root)
    with (root / "musiccaps-public.csv").open(newline="", encoding="utf-8") as f:
        for rec in csv.DictReader(f):
            tone(root / "audio" / f"[{rec['ytid']}]-[{rec['start_s']}-{rec['end_s']}].wav")
    return root


def make_music_instruct(root: Path) -> Path:
    """MusicInstruct/music_instruct.json ({"QA": [...]}) + MusicCaps clips named [<ytid>]-[30-40].wav."""
    _copy("music_instruct", root)
    qa = json.loads((root / "MusicInstruct" / "music_instruct.json").read_text())["QA"]
    for ytid in {r["ytid"] for r in qa}:
        tone(root / "musiccaps" / f"[{ytid}]-[30-40].wav")
    return root


def make_music_avqa(root: Path) -> Path:
    """data/json_update/avqa-test.json (8 real rows: 6 audio-only questions) + data/audio/<video_id>.wav."""
    _copy("music_avqa", root)
    for rec in json.loads((root / "data" / "json_update" / "avqa-test.json").read_text()):
        tone(root / "data" / "audio" / f"{rec['video_id']}.wav")
    return root


def make_gtzan(root: Path) -> Path:
    """genres/<genre>/<genre>.000NN.au for the 10 clips of test_filtered.txt (kept in root) + 2 clips not in it."""
    _copy("gtzan", root)
    names = [ln.split("/")[1] for ln in (root / "test_filtered.txt").read_text().split()]
    for name in names + ["blues.00000.wav", "rock.00099.wav"]:
        tone((root / "genres" / name.split(".")[0] / name).with_suffix(".au"))
    return root


def make_nsynth(root: Path) -> Path:
    """nsynth-test/examples.json (7 real notes) + nsynth-test/audio/<note_str>.wav; returns the parent folder."""
    _copy("nsynth", root)
    for note in json.loads((root / "nsynth-test" / "examples.json").read_text()):
        tone(root / "nsynth-test" / "audio" / f"{note}.wav")
    return root


def make_medley_solos(root: Path) -> Path:
    """Medley-solos-DB_metadata.csv (3 test, 1 training, 1 validation row) + Medley-solos-DB/<file>.wav."""
    _copy("medley_solos", root)
    with (root / "Medley-solos-DB_metadata.csv").open(newline="") as f:
        for r in csv.DictReader(f):
            name = f"Medley-solos-DB_{r['subset']}-{r['instrument_id']}_{r['uuid4']}.wav"
            tone(root / "Medley-solos-DB" / name)
    return root


def make_jamendolyrics(root: Path) -> Path:
    """JamendoLyrics.csv (5 real rows, 4 languages) + lyrics/<name>.txt (real) + mp3/<name>.mp3."""
    _copy("jamendolyrics", root)
    with (root / "JamendoLyrics.csv").open(newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            tone(root / "mp3" / r["Filepath"])
    return root


def make_opencpop(root: Path) -> Path:
    """segments/test.txt (3 lines in the documented format) + segments/train.txt (2 real lines) +
    segments/wavs/<uid>.wav."""
    _copy("opencpop", root)
    for split in ("test", "train"):
        for line in (root / "segments" / f"{split}.txt").read_text(encoding="utf-8").splitlines():
            tone(root / "segments" / "wavs" / f"{line.split('|')[0]}.wav")
    return root


def make_musdb18_lyrics(root: Path) -> Path:
    """The lyrics extension's test/<track>.txt + MUSDB18-HQ test/<track>/mixture.wav (30 s, the lines' span)."""
    _copy("musdb18_lyrics", root)
    for txt in (root / "test").glob("*.txt"):
        write_audio(root / "test" / txt.stem / "mixture.wav", make_tone(220.0, 30.0, sr=4000), sr=4000)
    return root


RELEASES: dict[str, Callable[[Path], Path]] = {
    "mmau": make_mmau,
    "mmar": make_mmar,
    "mmau_pro": make_mmau_pro,
    "muchomusic": make_muchomusic,
    "musiccaps": make_musiccaps,
    "music_instruct": make_music_instruct,
    "music_avqa": make_music_avqa,
    "gtzan": make_gtzan,
    "nsynth_family": make_nsynth,
    "nsynth_source": make_nsynth,
    "medley_solos": make_medley_solos,
    "jamendolyrics": make_jamendolyrics,
    "opencpop": make_opencpop,
    "musdb18_lyrics": make_musdb18_lyrics,
}
