"""Review round 18, a second look at fcb2c30 (libmpg123's notes captured, an MP3 that stops short decoded by
ffmpeg, decoded_seconds remembered per file) and e44b060 (a tied head untied, TagsKept): a healthy CBR MP3 without
a Xing frame (libsndfile guesses its length ~0.5 % long) was taken for one libmpg123 gave up in, decoded again by
ffmpeg at every read and warned about as damaged; decoded_seconds gave a replaced file's old length when the new
one kept the size and mtime (cp -p, an unpacked archive); what other threads wrote on stderr during a capture was
written back UTF-8-mangled, and a stderr gone (EPIPE) failed the read. Guards: fd 2 given back when a capture is
interrupted; float16 AMP counts one skipped step of several accumulated batches, and a resume keeps the count."""

from __future__ import annotations

import logging
import os
import threading

import numpy as np
import pytest
import soundfile as sf
import torch
from test_data_review17 import _ffmpeg
from tiny_assets import make_tone, write_audio


def test_a_healthy_cbr_mp3_without_a_xing_frame_is_decoded_once_not_again_by_ffmpeg(
    tmp_path, monkeypatch, caplog
):
    """A 30-s 44.1 kHz CBR MP3 written without a Xing/Info frame (older encoders, many rips): libsndfile guesses
    its length from the file's size and the first frame's (unpadded: 208 of 64 kbit/s frames averaging 209 bytes),
    0.15 s past where its frames end. Every read of the whole song stopped "0.15 s short" and was taken for an MP3
    libmpg123 gave up in: decoded a second time by ffmpeg (a process per read, each epoch) and warned about as
    truncated or damaged. Now the decode that ends where its counted frames end is the whole file."""
    from musicflamingo.audio import io as audio_io

    src = write_audio(tmp_path / "song.wav", make_tone(440.0, 30.0, sr=44100, amp=0.3), sr=44100)
    mp3 = _ffmpeg(src, tmp_path / "song.mp3", "-c:a", "libmp3lame", "-b:a", "64k", "-write_xing", "0")
    counted = audio_io._mp3_scanned_frames(mp3.read_bytes())
    guessed = sf.info(str(mp3)).frames
    assert counted is not None and guessed - counted > 44100 // 10  # the case: the guess overshoots > 0.1 s
    asked = []

    def no_other_decoder(path, *args):  # noqa: ANN001, ANN002, ANN202
        asked.append(path)
        raise RuntimeError("not wanted")

    monkeypatch.setattr(audio_io, "_read_ffmpeg", no_other_decoder)
    monkeypatch.setattr(audio_io, "_read_torchcodec", no_other_decoder)
    with caplog.at_level(logging.WARNING):
        x = audio_io.load_audio(str(mp3), 16000)
    assert asked == []
    assert not [r for r in caplog.records if "damaged" in r.getMessage()], caplog.text
    assert x.shape[0] == -(-counted * 16000 // 44100)  # every frame, the guess's 0.15 s not asked for
    # the length from an offset (what a segment past the end is measured against) is the frames', not the guess
    _, left = audio_io._decode_soundfile(str(mp3), 20.0, None, 16000)
    assert left == -(-counted * 16000 // 44100) - 320000


def test_decoded_seconds_decodes_a_file_replaced_with_the_same_size_and_mtime_again(tmp_path):
    """decoded_seconds remembered a file by its path, size and mtime: a file replaced by another of the same size
    whose mtime was kept (cp -p, rsync -a, an unpacked archive, os.replace of a copy2) gave the old file's length.
    2 s of mono and 1 s of stereo 16-bit WAV hold the same bytes."""
    from musicflamingo.data.dataset import decoded_seconds

    a = write_audio(tmp_path / "a.wav", make_tone(440.0, 2.0))
    b = write_audio(tmp_path / "b.wav", np.stack([make_tone(440.0, 1.0)] * 2, axis=1))
    assert a.stat().st_size == b.stat().st_size
    assert decoded_seconds(str(a), 16000) == 2.0
    st = a.stat()
    os.replace(b, a)
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))  # what cp -p / tar keep
    assert a.stat().st_size == st.st_size and a.stat().st_mtime_ns == st.st_mtime_ns
    assert decoded_seconds(str(a), 16000) == 1.0


def test_the_capture_of_libmpg123s_notes_gives_fd_2_back_when_interrupted_and_keeps_other_lines(tmp_path):
    """A KeyboardInterrupt (or a SIGTERM handler raising) inside the capture leaves fd 2 where it was, and what
    another thread wrote on stderr meanwhile is written there after, not taken for libmpg123's notes."""
    from musicflamingo.audio import io as audio_io

    mp3 = write_audio(tmp_path / "t.mp3", make_tone(440.0, 0.5))
    out = tmp_path / "stderr.txt"
    saved = os.dup(2)
    try:
        with open(out, "wb") as fh:
            os.dup2(fh.fileno(), 2)
        before = os.fstat(2)
        with pytest.raises(KeyboardInterrupt), audio_io._mpg123_notes(str(mp3)) as notes:
            os.write(2, b"Note: Illegal Audio-MPEG-Header 0x00000000 at offset 0.\n")
            t = threading.Thread(target=lambda: os.write(2, b"another thread's line \xff\xfe\n"))
            t.start()
            t.join()
            raise KeyboardInterrupt
        after = os.fstat(2)
        os.write(2, b"after\n")
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)
    assert notes == ["Note: Illegal Audio-MPEG-Header 0x00000000 at offset 0."]
    assert out.read_bytes() == b"another thread's line \xff\xfe\nafter\n"  # its bytes as written


def test_a_decode_outside_the_main_thread_is_not_captured_so_threads_decode_at_once(tmp_path, monkeypatch):
    """fd 2 is the process's, so captures take turns: serve's decoding threads would decode one MP3 at a time. A
    read outside the main thread leaves fd 2 alone (no dup2, no lock); another program's "Note: ..." line written
    during a main-thread capture is written back, not taken for libmpg123's."""
    from musicflamingo.audio import io as audio_io

    mp3 = write_audio(tmp_path / "t.mp3", make_tone(440.0, 0.5))
    redirected = []
    real_dup2 = os.dup2
    monkeypatch.setattr(audio_io.os, "dup2", lambda a, b: (redirected.append(b), real_dup2(a, b))[1])
    held = []

    def in_a_thread():
        with audio_io._mpg123_notes(str(mp3)) as notes:
            held.append(audio_io._stderr_lock.locked())
        held.append(notes)

    t = threading.Thread(target=in_a_thread)
    t.start()
    t.join()
    assert redirected == [] and held == [False, []]
    out = tmp_path / "stderr.txt"
    saved = os.dup(2)
    try:
        with open(out, "wb") as fh:
            real_dup2(fh.fileno(), 2)
        with audio_io._mpg123_notes(str(mp3)) as notes:
            os.write(2, b"Note: the cache is warm\n")
    finally:
        real_dup2(saved, 2)
        os.close(saved)
    assert redirected  # the main thread's read is captured
    assert notes == [] and out.read_bytes() == b"Note: the cache is warm\n"


def test_a_stderr_gone_does_not_fail_the_decode(tmp_path):
    """stderr a pipe whose reader went away (a server's log collector restarted, `| head`): what another thread
    wrote there during the capture could not be written back, and that EPIPE failed the MP3's read."""
    from musicflamingo.audio import io as audio_io

    mp3 = write_audio(tmp_path / "t.mp3", make_tone(440.0, 0.5))
    r, w = os.pipe()
    os.close(r)
    saved = os.dup(2)
    try:
        os.dup2(w, 2)
        os.close(w)
        with audio_io._mpg123_notes(str(mp3)):
            os.write(2, b"a log line\n")
        x = audio_io.load_audio(str(mp3), 16000)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    assert x.shape[0] > 0


def test_float16_amp_counts_one_skipped_step_of_several_accumulated_batches(tmp_path):
    """trainer.accumulate_grad_batches=2 under 16-mixed: one optimizer step of two micro-batches the GradScaler
    skips is one skipped step (not one per batch), and a resume continues the count."""
    from lightning.pytorch.plugins import MixedPrecision
    from test_loss_review8 import fit_one_step
    from train_fixtures import compose_train, write_dataset, write_processor

    from musicflamingo.data.collate import collate
    from musicflamingo.data.dataset import ConversationDataset
    from musicflamingo.data.manifest import read_manifest
    from musicflamingo.processor import MusicFlamingoProcessor

    proc_dir, manifest = write_processor(tmp_path / "proc"), write_dataset(tmp_path / "data", n=2)
    dataset = ConversationDataset(read_manifest(manifest), MusicFlamingoProcessor.from_pretrained(proc_dir))
    batches = [collate([dataset[i]], dataset.processor.pad_token_id) for i in range(2)]
    cfg = compose_train(tmp_path, manifest, proc_dir, ["trainer.max_steps=1"])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)
    change, trainer = fit_one_step(cfg, batches, 2, [MixedPrecision("16-mixed", "cpu", scaler)])
    lit = trainer.lightning_module
    assert trainer.global_step == 1 and max(float(c.abs().max()) for c in change.values()) == 0
    assert lit.amp_skipped_steps == 1 and scaler.get_scale() == 2.0**99
    checkpoint: dict = {"state_dict": lit.state_dict()}
    lit.on_save_checkpoint(checkpoint)
    assert checkpoint["amp_skipped_steps"] == 1
    lit.amp_skipped_steps = 0
    lit.on_load_checkpoint(checkpoint)
    assert lit.amp_skipped_steps == 1
