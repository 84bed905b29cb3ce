"""Shared by the parts of ``competition init``: how much is read, and the words it looks for."""
from __future__ import annotations

import re

from competition.errors import UserError

SAMPLE = 24  # images / rows read to decide sizes, channels, pixel order and overlaps
VOID_NAMES = {"void", "ignore", "ignored", "unlabelled", "unlabeled", "dontcare", "dont_care", "don't care"}
_GROUP_HINT = re.compile(r"group|patient|subject|sequence|seq|video|clip|case|site|study|scene|series|"
                         r"session|slide|well|plate|volume|scan|camera|source", re.I)
_CLASS_HINT = re.compile(r"class|label|categor|type|attribute", re.I)
_NAME_HINT = re.compile(r"name|label|class|categor", re.I)
_RLE_HINT = re.compile(r"rle|encoded|pixels|mask|segment", re.I)
_MASK_HINT = re.compile(r"mask|label|gt|annot|seg|truth", re.I)
_RLE_CELL = re.compile(r"^\d+(\s+\d+)+$")


class InitError(UserError, ValueError):
    """The folder is not a layout ``competition init`` recognises; the message says what it looked for."""
