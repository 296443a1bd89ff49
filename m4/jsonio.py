"""Reading and writing the JSON record files that the tools exchange (M4-Instruct data, benches)."""

import json
import os
from pathlib import Path

from m4.errors import M4Error


def read_json_list(path: Path, what: str) -> list:
    """The list a JSON file holds, or one clear error naming `what` it should have been."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise M4Error(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise M4Error(f"cannot read {path}: {e}") from None
    if not isinstance(data, list):
        raise M4Error(f"{path}: expected a JSON list of records")
    return data


def write_json_list(path: Path, records: list) -> None:
    """Written beside `path`, then moved into place: a file a run is reading is never half written."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(records, f)
    os.replace(tmp, path)
