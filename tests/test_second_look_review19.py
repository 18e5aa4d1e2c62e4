"""A second look at review round 19's serve and eval-parsing commits, with inputs that broke them.

A lead-in letter ("Based on the audio, B.") read as a claim beside the stated ones and before the option texts
turned descriptions of the music ("Key: D.", "the tonic, C.") into answers: a stated letter became ambiguous and an
answer naming its option's text scored as the described letter. A 500 from a server with cors_origins carried no
Access-Control-Allow-Origin (its handler ran outside the CORS middleware), so a browser page saw a CORS failure
instead of the error.
"""

from __future__ import annotations

import pytest

from musicflamingo.eval.parsing import ChoiceParse, parse_choice

GENRES = ["Rock", "Jazz", "Blues", "Pop"]


# ---- eval parsing: a lead-in letter is the last rule ---------------------------------------------------------
@pytest.mark.parametrize(
    ("answer", "parsed"),
    [
        # a stated claim beside a described key (was ambiguous: the key's letter counted as a second claim)
        ("The track is in the key: D. I think it's B.", ChoiceParse(1, "ok", "claim")),
        ("Key: D\nTempo: 120 BPM\nI'd go with B.", ChoiceParse(1, "ok", "claim")),
        # an option's text beside a described key or tonic (was the letter D / A, a wrong answer)
        ("Key: D. The genre is Jazz.", ChoiceParse(1, "ok", "text")),
        ("Tempo: 96 BPM. Key: A.\nGenre: Jazz", ChoiceParse(1, "ok", "text")),
        ("It ends on the tonic, A. It is a jazz piece.", ChoiceParse(1, "ok", "text")),
        ("Key: D.\n(B) Jazz", ChoiceParse(1, "ok", "letter")),
        # still read where nothing else names an option, or the texts name only that letter's option
        ("Based on the audio, B.", ChoiceParse(1, "ok", "claim")),
        ("Based on the audio, B. Jazz drumming throughout.", ChoiceParse(1, "ok", "claim")),
        ("Based on the audio, B. Actually, C.", ChoiceParse(None, "ambiguous", "claim")),
    ],
)
def test_a_lead_in_letter_is_read_only_where_nothing_else_names_an_option(answer, parsed):
    assert parse_choice(answer, GENRES) == parsed
