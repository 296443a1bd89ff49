"""The one exception type for bad input.

Anything a user can get wrong (a missing file, an image that does not decode, a camera
that is not there, a checkpoint in the wrong layout) raises M4Error with a message that
fits on one line. The CLI prints it as `m4: error: ...` and exits non-zero; anything else
that escapes is a bug and keeps its traceback.
"""


class M4Error(Exception):
    pass
