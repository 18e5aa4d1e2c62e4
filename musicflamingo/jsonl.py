"""Where a JSON Lines file breaks into records, one rule for training manifests and benchmark files.

A record ends at "\n" or "\r\n", and at the other control characters `str.splitlines` breaks at, which JSON cannot
hold raw inside a string (so a break there never cuts a record). Not at U+0085, U+2028 or U+2029: they are valid
raw inside JSON strings (`json.dumps(..., ensure_ascii=False)` writes them so, e.g. in lyrics), so they are text,
as JSON Lines says; `str.splitlines` would cut the record there.
"""

from __future__ import annotations

import re

OTHER_BREAKS = (0x0B, 0x0C, 0x1C, 0x1D, 0x1E)  # besides "\n" and "\r"
LINE_BREAK = re.compile("\r\n|[\n\r\x0b\x0c\x1c\x1d\x1e]")
