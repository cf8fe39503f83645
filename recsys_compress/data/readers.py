"""Readers that turn interaction logs on disk into one in-memory table.

Three formats, chosen by ``dataset.format``:

* ``grouplens_csv``: GroupLens ``ratings.csv`` (userId,movieId,rating,timestamp) plus an
  optional ``movies.csv`` (movieId,title,genres), e.g. MovieLens latest-small.
* ``recbole_atomic``: RecBole atomic files ``NAME.inter`` (+ optional ``NAME.item``), typed
  ``name:type`` headers, tab separated, LF or CRLF line ends.
* ``sequence_text``: one user per line, ``user item item ...`` already in time order.

Readers only parse: every malformed row is an error naming file, line number and content,
so nothing is silently dropped. Filtering happens later, in ``preprocess``.
"""

from __future__ import annotations

import csv
import io
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path


log = logging.getLogger(__name__)


class DataFormatError(ValueError):
    """A data file is missing or does not follow its format."""


@dataclass
class ItemInfo:
    """What we know about an item beyond its id; any field may be missing."""

    title: str | None = None
    year: str | None = None
    genres: list[str] = field(default_factory=list)

    def text(self) -> str:
        """Natural-language description used by text-initialised and representation models."""
        parts = []
        if self.title:
            title = self.title
            # GroupLens titles already carry "(1995)"; do not repeat the year.
            if self.year and f"({self.year})" not in title:
                title = f"{title} ({self.year})"
            parts.append(title)
        elif self.year:
            parts.append(f"({self.year})")
        if self.genres:
            parts.append("Genres: " + ", ".join(self.genres))
        return ". ".join(parts)


@dataclass
class RawInteractions:
    """Interaction log in file order, with raw (string) ids."""

    users: list[str]
    items: list[str]
    ratings: list[float] | None
    timestamps: list[float] | None
    item_info: dict[str, ItemInfo]
    source: str
    # Demographic profile per raw user id (e.g. age, gender, occupation), where the data has one.
    user_info: dict[str, dict[str, str]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.users)


def require_file(path: Path, expected: str) -> Path:
    if not path.is_file():
        folder = path.parent
        present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        raise DataFormatError(
            f"data file not found: {path}\n  expected: {expected}\n"
            f"  folder {('contains: ' + (', '.join(present) or '(nothing)')) if folder.is_dir() else 'does not exist'}"
        )
    return path


def read_text(path: Path, line_based: bool = True) -> str:
    """A data file's text; a file that is not UTF-8 (binary, another encoding) names itself.
    ``line_based``: the format ends every line with a newline (a JSON file need not)."""
    data = path.read_bytes()
    if line_based and data and not data.endswith(b"\n"):
        # Line-based files end with a newline; one that does not was probably cut off (an
        # interrupted copy), and its last line can hold a cut-off number that parses as a valid one.
        last = data.rsplit(b"\n", 1)[-1].decode("utf-8", errors="replace")
        log.warning("%s does not end with a newline: it may be truncated (an interrupted copy?); its last line "
                    "is %r", path, last[:200])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataFormatError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
            "data files must be UTF-8 (is this the right file?)"
        ) from None


def _to_float(value: str, path: Path, lineno: int, line: str, column: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise DataFormatError(
            f"{path}:{lineno}: column '{column}' is not a number ({value!r}); line: {line!r}"
        ) from None


_YEAR_IN_TITLE = re.compile(r"\((\d{4})\)\s*$")


def read_grouplens_csv(folder: str | Path) -> RawInteractions:
    """Read ``ratings.csv`` (required) and ``movies.csv`` (optional) from ``folder``."""
    folder = Path(folder)
    ratings_path = require_file(
        folder / "ratings.csv", "ratings.csv (userId,movieId,rating,timestamp) [+ movies.csv]"
    )
    users, items, ratings, timestamps = [], [], [], []
    with io.StringIO(read_text(ratings_path), newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        expected = ["userId", "movieId", "rating", "timestamp"]
        if header is None or [h.strip() for h in header[:4]] != expected:
            raise DataFormatError(
                f"{ratings_path}:1: header must start with {','.join(expected)}; got {header!r}"
            )
        for row in reader:
            lineno = reader.line_num
            if not row:
                continue
            line = ",".join(row)
            if len(row) < 4:
                raise DataFormatError(
                    f"{ratings_path}:{lineno}: expected 4 fields, got {len(row)}; line: {line!r}"
                )
            users.append(row[0].strip())
            items.append(row[1].strip())
            ratings.append(_to_float(row[2], ratings_path, lineno, line, "rating"))
            timestamps.append(_to_float(row[3], ratings_path, lineno, line, "timestamp"))

    item_info: dict[str, ItemInfo] = {}
    movies_path = folder / "movies.csv"
    if movies_path.is_file():
        with io.StringIO(read_text(movies_path), newline="") as f:
            reader = csv.reader(f)
            next(reader, None)
            for row in reader:
                if not row:
                    continue
                if len(row) < 3:
                    raise DataFormatError(
                        f"{movies_path}:{reader.line_num}: expected movieId,title,genres; "
                        f"line: {','.join(row)!r}"
                    )
                title = row[1].strip()
                year = _YEAR_IN_TITLE.search(title)
                genres = [g for g in row[2].split("|") if g and g != "(no genres listed)"]
                item_info[row[0].strip()] = ItemInfo(title, year.group(1) if year else None, genres)
    return RawInteractions(users, items, ratings, timestamps, item_info, str(folder))


def _read_atomic_table(path: Path) -> tuple[list[str], list[str], list[tuple[int, str, list[str]]]]:
    """Parse a RecBole atomic file: returns names, types and (lineno, line, fields) rows."""
    lines = read_text(path).splitlines()  # handles \n, \r\n and a final newline alike
    if not lines:
        raise DataFormatError(f"{path}: file is empty (expected a typed 'name:type' header)")
    names, types = [], []
    for col in lines[0].split("\t"):
        if ":" not in col:
            raise DataFormatError(
                f"{path}:1: header column {col!r} is not 'name:type'; header: {lines[0]!r}"
            )
        name, typ = col.rsplit(":", 1)
        if typ not in {"token", "token_seq", "float", "float_seq"}:
            raise DataFormatError(
                f"{path}:1: column {name!r} has unknown type {typ!r}; "
                "allowed: token, token_seq, float, float_seq"
            )
        names.append(name)
        types.append(typ)
    rows = []
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(names):
            raise DataFormatError(
                f"{path}:{lineno}: expected {len(names)} tab-separated fields "
                f"({', '.join(names)}), got {len(fields)}; line: {line!r}"
            )
        rows.append((lineno, line, fields))
    return names, types, rows


def _find_column(names: list[str], *candidates: str, contains: str | None = None) -> int | None:
    for c in candidates:
        if c in names:
            return names.index(c)
    if contains is not None:
        for i, n in enumerate(names):
            if contains in n:
                return i
    return None


def _read_side_table(path: Path, id_column: str) -> tuple[list[str], list[list[str]], int] | None:
    """An optional ``.item``/``.user`` file: column names, field rows and the id column; None if absent."""
    if not path.is_file():
        return None
    names, _, rows = _read_atomic_table(path)
    index = _find_column(names, id_column)
    if index is None:
        raise DataFormatError(f"{path}:1: header must contain {id_column}; got {names}")
    return names, [fields for _, _, fields in rows], index


def read_recbole_atomic(folder: str | Path, name: str | None = None) -> RawInteractions:
    """Read ``NAME.inter`` (required) and ``NAME.item`` (optional) from ``folder``.

    ``name`` defaults to the folder name, as RecBole does.
    """
    folder = Path(folder)
    name = name or folder.name
    inter_path = require_file(
        folder / f"{name}.inter",
        f"{name}.inter with typed header containing user_id:token and item_id:token "
        f"[+ {name}.item]",
    )
    names, _types, rows = _read_atomic_table(inter_path)
    iu, ii = _find_column(names, "user_id"), _find_column(names, "item_id")
    if iu is None or ii is None:
        raise DataFormatError(
            f"{inter_path}:1: header must contain user_id and item_id; got {', '.join(names)}"
        )
    ir, it = _find_column(names, "rating"), _find_column(names, "timestamp")
    users = [r[2][iu] for r in rows]
    items = [r[2][ii] for r in rows]
    ratings = (
        [_to_float(f[ir], inter_path, n, line, "rating") for n, line, f in rows]
        if ir is not None
        else None
    )
    timestamps = (
        [_to_float(f[it], inter_path, n, line, "timestamp") for n, line, f in rows]
        if it is not None
        else None
    )

    item_info: dict[str, ItemInfo] = {}
    item_table = _read_side_table(folder / f"{name}.item", "item_id")
    if item_table is not None:
        inames, irows, iid = item_table
        ititle = _find_column(inames, "movie_title", "title", contains="title")
        iyear = _find_column(inames, "release_year", "year", contains="year")
        igenre = _find_column(inames, "genre", "genres", "class", "categories")
        for f in irows:
            year = f[iyear].strip() if iyear is not None else ""
            if year.endswith(".0"):
                year = year[:-2]
            item_info[f[iid]] = ItemInfo(
                title=f[ititle].strip() or None if ititle is not None else None,
                year=year or None,
                genres=f[igenre].split() if igenre is not None else [],
            )
    user_info: dict[str, dict[str, str]] = {}
    user_table = _read_side_table(folder / f"{name}.user", "user_id")
    if user_table is not None:
        unames, urows, uid = user_table
        for f in urows:
            user_info[f[uid]] = {n: v.strip() for n, v in zip(unames, f) if n != "user_id" and v.strip()}
    return RawInteractions(users, items, ratings, timestamps, item_info, str(folder), user_info)


# MovieLens-1M stores age and occupation as codes (its README); ML-100K spells them out.
ML1M_AGES = {"1": "under 18", "18": "18-24", "25": "25-34", "35": "35-44", "45": "45-49", "50": "50-55",
             "56": "56 or older"}
ML1M_OCCUPATIONS = [
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student", "customer service",
    "doctor/health care", "executive/managerial", "farmer", "homemaker", "K-12 student", "lawyer",
    "programmer", "retired", "sales/marketing", "scientist", "self-employed", "technician/engineer",
    "tradesman/craftsman", "unemployed", "writer",
]


def describe_user(profile: dict[str, str], coded: bool = False) -> str | None:
    """A user's profile in words ("age 25-34, female, writer"); None without a profile.

    ``coded``: age and occupation are MovieLens-1M codes. The zip code is left out: as text it
    says little to a language model.
    """
    def clean(v: str) -> str:
        return v[:-2] if v.endswith(".0") else v

    parts = []
    age = clean(profile.get("age", ""))
    if age:
        parts.append(f"age {ML1M_AGES.get(age, age) if coded else age}")
    gender = profile.get("gender", "")
    if gender:
        parts.append({"M": "male", "F": "female"}.get(gender, gender))
    occupation = clean(profile.get("occupation", ""))
    if occupation:
        if coded and occupation.isdigit() and int(occupation) < len(ML1M_OCCUPATIONS):
            occupation = ML1M_OCCUPATIONS[int(occupation)]
        parts.append(occupation)
    return ", ".join(parts) or None


_ITEM_ID = re.compile(r"[0-9]+")


def read_sequence_text(path: str | Path) -> RawInteractions:
    """Read ``user item item ...`` lines; the position in the line is the time order."""
    path = require_file(Path(path), "a text file with one 'user item item ...' line per user")
    users, items, timestamps = [], [], []
    for lineno, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        tokens = line.split()
        if len(tokens) < 2:
            raise DataFormatError(
                f"{path}:{lineno}: expected 'user item [item ...]', got only {len(tokens)} "
                f"token(s); line: {line!r}"
            )
        user = tokens[0]
        for item in tokens[1:]:
            # Item ids are integers in this format: anything else is a corrupt or foreign line,
            # which would otherwise enter the catalogue as new items.
            if not _ITEM_ID.fullmatch(item):
                raise DataFormatError(
                    f"{path}:{lineno}: item id {item!r} is not a non-negative integer; line: {line!r}"
                )
            # A global counter keeps file order even when a user spans several lines.
            timestamps.append(float(len(items)))
            users.append(user)
            items.append(item)
    return RawInteractions(users, items, None, timestamps, {}, str(path))
