"""A committed results folder that is being regenerated.

A change to a method's or the evaluation's code gives its cells new keys, and the committed
records then belong to the old code.  Regenerating a whole grid at three seeds takes hours of
CPU, more than one working session, so the change lands first and the folder says, in a file
beside its records, since which commit its records are the old code's and why.  While that file
is there the committed-records test accepts the folder's old keys, and every report built from it
opens with the notice, so no table passes for the current code's.  The file goes when the last
cell is regenerated (the test fails if it stays once every record is current).

The records the current code has made so far wait in `regenerated/records/` beside the old ones
(REGENERATED_DIR), committed at the end of each working session so that the next resumes from
them, and read by no report: a folder's tables come from one code.  When the last cell is done
they replace `records/` and both the file and the folder go.

    # results/semistructured/REGENERATING.yaml
    since: 1a2b3c4            # the first commit whose code re-keys these records
    reason: the sequence-start rule in data.py and fused MaskLLM / PATCH gates
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from prunebench.errors import UserError
from prunebench.bounded_yaml import load_yaml

PENDING_FILE = "REGENERATING.yaml"
REGENERATED_DIR = "regenerated"  # under the folder: the current code's records so far
_COMMIT = re.compile(r"[0-9a-f]{7,40}")
MAX_REASON = 300


@dataclass(frozen=True)
class Regeneration:
    since: str  # the commit (hex, 7-40 digits) from which the current code keys these cells anew
    reason: str  # what changed, one line

    def notice(self) -> str:
        return (f"Being regenerated: these records were made by the code before commit {self.since} "
                f"({self.reason}); their figures are that code's, not the current code's.")


def pending_regeneration(results_dir) -> Regeneration | None:
    """The folder's declared regeneration, or None.  A malformed file is an error, never ignored."""
    path = Path(results_dir) / PENDING_FILE
    if not path.is_file():
        return None
    data = load_yaml(path.read_bytes(), str(path))
    if not isinstance(data, dict) or set(data) != {"since", "reason"}:
        raise UserError(f"{path} must hold exactly `since` (a commit) and `reason` (one line)")
    since, reason = str(data["since"]), data["reason"]
    if not _COMMIT.fullmatch(since):
        raise UserError(f"{path}: since {since!r} is not a commit hash (7-40 hex digits)")
    if not isinstance(reason, str) or not reason.strip() or "\n" in reason.strip() or len(reason) > MAX_REASON:
        raise UserError(f"{path}: reason must be one non-empty line of at most {MAX_REASON} characters")
    return Regeneration(since, reason.strip())
