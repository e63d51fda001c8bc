"""Label files as rows: the CSV a person or a script writes (``id,label`` or ``path,label``), and
the batch CSV a query writes (``id,path,score``). Label Studio's files are in
:mod:`.labelstudio_files`.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from pathlib import Path

from ..atomic import atomic_write_text
from ..errors import FileFormatError, LabelImportError, read_text

CSV_FIX = "write a header `id,label` or `path,label` and one item per line"


class LabelRow(tuple):
    """One answer, ``(key, label)``: ``key`` an item id (int) or the item's path relative to the
    images folder (str), ``label`` a class name. A plain 2-tuple to unpack; ``where`` says where
    it came from (``labels.csv:5``), for error messages."""

    where: str

    def __new__(cls, key: int | str, label: str, where: str = "") -> LabelRow:
        row = super().__new__(cls, (key, label))
        row.where = where
        return row

    @property
    def key(self) -> int | str:
        return self[0]

    @property
    def label(self) -> str:
        return self[1]


def parse_key(text: str, by_path: bool) -> int | str:
    """An item key from text: an integer id (digits, unless ``by_path``), else a path."""
    text = text.strip()
    if not by_path and text.isdigit():
        return int(text)
    return text


def read_labels_csv(path: str | Path) -> list[LabelRow]:
    """The rows of a labels CSV: a header ``id,label`` (an id may also be a relative path) or
    ``path,label``, then one ``key,label`` per line; blank lines are skipped. A header other
    than these is a :class:`FileFormatError`; lines without exactly two fields are refused
    together in one :class:`LabelImportError` listing each."""
    path = Path(path)
    text = read_text(path, CSV_FIX)
    rows: list[LabelRow] = []
    problems = []
    header: list[str] | None = None
    reader = csv.reader(io.StringIO(text))
    for fields in reader:
        line = reader.line_num
        if not fields or all(not f.strip() for f in fields):
            continue
        if header is None:
            header = [f.strip().lower() for f in fields]
            if header not in (["id", "label"], ["path", "label"]):
                raise FileFormatError(
                    path,
                    line,
                    f"header {','.join(fields)!r} is not id,label nor path,label",
                    CSV_FIX,
                )
            continue
        if len(fields) != 2:
            problems.append(f"{path.name}:{line}: {len(fields)} fields: expected 2 (key,label)")
            continue
        key = parse_key(fields[0], by_path=header[0] == "path")
        rows.append(LabelRow(key, fields[1].strip(), f"{path.name}:{line}"))
    if problems:
        raise LabelImportError(
            f"{path}: refused, nothing imported: {len(problems)} malformed line(s): "
            + "; ".join(problems),
            problems,
        )
    return rows


def read_labels_file(path: str | Path) -> list[LabelRow]:
    """The rows of a labels CSV or of a Label Studio JSON export (``.json``, or text that
    starts with ``[``)."""
    from .labelstudio_files import read_labelstudio_export

    path = Path(path)
    if not path.is_file():
        raise FileFormatError(path, 1, "file not found", "give the path of a labels file")
    if path.suffix.lower() == ".json" or read_text(path, CSV_FIX).lstrip().startswith("["):
        return read_labelstudio_export(path)
    return read_labels_csv(path)


def write_batch_csv(path: Path, rows: Iterable[tuple[int, str, float | None]]) -> None:
    """``id,path,score`` rows, best first, atomically (an empty score: the strategy has none)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["id", "path", "score"])
    for item_id, item_path, score in rows:
        writer.writerow([item_id, item_path, "" if score is None else repr(float(score))])
    atomic_write_text(path, out.getvalue())
