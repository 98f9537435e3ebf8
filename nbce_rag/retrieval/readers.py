"""Every file format nbce-rag reads, in one place; every command reads through it.

=====================  ======================================================================
Training pairs         :func:`read_pairs` (STS-B TSV, CSV or JSONL ``text1, text2, score``),
                       :func:`read_stsb`, :func:`as_pairs` (pairs given in code)
Retrieval sets (BEIR)  :func:`read_beir` (``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``),
                       :func:`read_beir_corpus`, :class:`BeirData`
Queries                :func:`read_queries`: BEIR ``queries.jsonl`` (``_id``/``id`` + ``text``) or
                       ``id<TAB>text`` lines; :func:`load_queries` also takes a mapping or pairs
Qrels                  :func:`read_qrels`: BEIR TSV ``query-id corpus-id score`` (header optional)
                       or TREC ``qid 0 docid rel`` (4 columns); :func:`load_qrels` also takes a
                       mapping or ``(qid, doc_id, rel)`` triples
Documents              :func:`read_documents`: ``.txt``/``.md``/``.rst``, ``.jsonl`` rows, ``.pdf``
                       pages (the ``pdf`` extra), with a :class:`ReadReport`
=====================  ======================================================================

A malformed file raises :class:`~nbce_rag.errors.CorruptFileError` naming the file and line;
a missing one :class:`~nbce_rag.errors.ConfigError`.

Score scale of training pairs: CoSENT only uses the *order* of the scores inside a batch, so
the scale does not change training. Scores are still normalised to ``[0, 1]`` so that they
read like the cosines they are compared with in reports: :func:`read_pairs` divides by 5 when
the file is STS-B, or when ``score_scale="auto"`` (the default) finds a score above 1 and none
above 5.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from nbce_rag.errors import ConfigError, CorruptFileError
from nbce_rag.types import Passage

logger = logging.getLogger(__name__)

Pair = Tuple[str, str, float]
PathLike = Union[str, "os.PathLike[str]"]

_TEXT1_KEYS = ("text1", "sentence1", "s1", "query", "anchor")
_TEXT2_KEYS = ("text2", "sentence2", "s2", "passage", "positive")
_SCORE_KEYS = ("score", "label", "similarity")


# --------------------------------------------------------------------------- pair files


def read_stsb(path: PathLike, *, normalize: bool = True) -> List[Pair]:
    """Read an STS-B file (``sts-train.csv`` etc., tab-separated despite the name).

    Returns ``(s1, s2, score)`` with the gold score divided by 5 when ``normalize`` (the
    default), so scores lie in ``[0, 1]``. Rows with fewer than 7 fields or a non-numeric score
    raise :class:`CorruptFileError` naming the line.
    """
    path = Path(path)
    pairs: List[Pair] = []
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 7:
                raise CorruptFileError(
                    f"{path}:{lineno}: an STS-B row needs 7 tab-separated fields "
                    f"(genre file year id score s1 s2), got {len(fields)}"
                )
            try:
                score = float(fields[4])
            except ValueError:
                raise CorruptFileError(f"{path}:{lineno}: score {fields[4]!r} is not a number") from None
            pairs.append((fields[5], fields[6], score / 5.0 if normalize else score))
    return pairs


def read_pairs(path: PathLike, *, score_scale: Union[str, float, None] = "auto") -> List[Pair]:
    """Read ``(text1, text2, score)`` pairs from STS-B TSV, CSV or JSONL (detected from content).

    ``score_scale``: ``"auto"`` (divide by 5 when the largest score is in ``(1, 5]``, which is
    the STS-B 0-5 scale), a number to divide every score by, or ``None`` to keep them as given.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"pair file {path} does not exist")
    first = ""
    with _open_text(path) as f:
        for line in f:
            if line.strip():
                first = line
                break
    if not first:
        raise ConfigError(f"pair file {path} is empty")
    if path.suffix.lower() == ".jsonl" or first.lstrip().startswith("{"):
        pairs = _read_pairs_jsonl(path)
    elif _looks_like_stsb(first):
        pairs = read_stsb(path, normalize=False)
    else:
        pairs = _read_pairs_csv(path, first)
    if not pairs:
        raise ConfigError(f"pair file {path} holds no pairs")
    return scale_pairs(pairs, score_scale, path)


def _looks_like_stsb(line: str) -> bool:
    fields = line.rstrip("\r\n").split("\t")
    if len(fields) < 7:
        return False
    try:
        float(fields[4])
    except ValueError:
        return False
    return True


def scale_pairs(pairs: List[Pair], score_scale: Union[str, float, None], path: Path) -> List[Pair]:
    """``pairs`` with their scores divided as ``score_scale`` says (see :func:`read_pairs`);
    ``path`` only names the source in the log."""
    if score_scale is None:
        return pairs
    if score_scale == "auto":
        top = max(p[2] for p in pairs)
        low = min(p[2] for p in pairs)
        if 1.0 < top <= 5.0 and low >= 0.0:
            logger.info("%s: scores look like the 0-5 STS scale; dividing by 5", path)
            div = 5.0
        else:
            return pairs
    else:
        div = float(score_scale)
        if div <= 0:
            raise ConfigError(f"score_scale must be positive, got {score_scale}")
    return [(a, b, s / div) for a, b, s in pairs]




def _pick(row: Dict[str, Any], keys: Sequence[str]) -> Any:
    for k in keys:
        if k in row:
            return row[k]
    return None


def _read_pairs_jsonl(path: Path) -> List[Pair]:
    return [_row_to_pair(row, f"{path}:{lineno}") for lineno, row in _iter_jsonl(path, objects_only=False)]


def _read_pairs_csv(path: Path, first: str) -> List[Pair]:
    delimiter = "\t" if first.count("\t") > first.count(",") else ","
    pairs: List[Pair] = []
    with _open_text(path) as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        header = [h.strip().lower() for h in (reader.fieldnames or [])]
        reader.fieldnames = header
        if not any(k in header for k in _TEXT1_KEYS):
            raise CorruptFileError(
                f"{path}: a CSV pair file needs a header with text1,text2,score (got {header})"
            )
        for lineno, row in enumerate(reader, 2):
            pairs.append(_row_to_pair(row, f"{path}:{lineno}"))
    return pairs


def _row_to_pair(row: Any, where: str) -> Pair:
    if isinstance(row, (list, tuple)) and len(row) == 3:
        a, b, s = row
    elif isinstance(row, dict):
        a, b, s = _pick(row, _TEXT1_KEYS), _pick(row, _TEXT2_KEYS), _pick(row, _SCORE_KEYS)
    else:
        raise CorruptFileError(f"{where}: expected an object with text1, text2, score")
    if not isinstance(a, str) or not isinstance(b, str):
        raise CorruptFileError(f"{where}: text1 and text2 must be strings")
    try:
        score = float(s)
    except (TypeError, ValueError):
        raise CorruptFileError(f"{where}: score {s!r} is not a number") from None
    return (a, b, score)


def as_pairs(pairs: Iterable[Any]) -> List[Pair]:
    """Normalise user pairs: tuples ``(t1, t2, score)``, dicts with text1/text2/score, or
    sentence-transformers ``InputExample`` objects (``texts``, ``label``)."""
    out: List[Pair] = []
    for i, p in enumerate(pairs):
        if hasattr(p, "texts") and hasattr(p, "label"):
            t1, t2 = p.texts[0], p.texts[1]
            out.append((t1, t2, float(p.label)))
        else:
            try:
                out.append(_row_to_pair(p, f"pair {i}"))
            except CorruptFileError as e:
                raise ConfigError(str(e)) from None
    return out


# --------------------------------------------------------------------------- BEIR, queries, qrels


@dataclass
class BeirData:
    """A BEIR-style retrieval set: ``corpus[id] = (title, text)``, ``queries[id] = text``,
    ``qrels[qid][doc_id] = grade``."""

    corpus: Dict[str, Tuple[str, str]]
    queries: Dict[str, str]
    qrels: Dict[str, Dict[str, int]] = field(default_factory=dict)

    def doc_text(self, doc_id: str) -> str:
        title, text = self.corpus[doc_id]
        return f"{title}\n{text}" if title else text


def read_beir_corpus(path: PathLike) -> Dict[str, Tuple[str, str]]:
    """``corpus.jsonl`` rows ``{"_id", "title", "text"}`` -> ``{id: (title, text)}``."""
    corpus: Dict[str, Tuple[str, str]] = {}
    for lineno, row in _iter_jsonl(Path(path)):
        did = row.get("_id", row.get("id"))
        if did is None:
            raise CorruptFileError(f"{path}:{lineno}: corpus row without _id")
        corpus[str(did)] = (str(row.get("title") or ""), str(row.get("text") or ""))
    return corpus


def read_queries(path: PathLike) -> Dict[str, str]:
    """Queries from a BEIR ``queries.jsonl`` (``_id``/``id`` + ``text``) or ``id<TAB>text`` lines."""
    path = Path(path)
    out: Dict[str, str] = {}
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            if line.lstrip().startswith("{"):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CorruptFileError(f"{path}:{lineno}: not valid JSON ({e})") from None
                qid = row.get("_id", row.get("id")) if isinstance(row, dict) else None
                if qid is None or not isinstance(row.get("text"), str):
                    raise CorruptFileError(f"{path}:{lineno}: a query line needs '_id' (or 'id') and 'text'")
                out[str(qid)] = row["text"]
            else:
                parts = line.split("\t", 1)
                if len(parts) != 2:
                    raise CorruptFileError(f"{path}:{lineno}: expected JSONL or 'id<TAB>text'")
                out[parts[0]] = parts[1]
    return out


#: column names that mark a qrels header row
_QRELS_HEADER = ("query-id", "query_id", "qid", "query", "score", "rel", "relevance", "label")

#: BEIR's name for the queries reader
read_beir_queries = read_queries


def read_qrels(path: PathLike) -> Dict[str, Dict[str, float]]:
    """Qrels ``{query_id: {doc_id: relevance}}`` from a BEIR TSV (``query-id corpus-id score``,
    header optional) or a TREC file (``qid 0 docid rel``: the second column is ignored).
    Columns are split on tabs when the line has one, else on white space."""
    path = Path(path)
    out: Dict[str, Dict[str, float]] = {}
    first = True
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            fields = line.strip().split("\t") if "\t" in line.strip() else line.split()
            if not fields or not any(fields):
                continue
            if len(fields) == 4:
                q, _, d, v = fields
            elif len(fields) == 3:
                q, d, v = fields
            else:
                raise CorruptFileError(f"{path}:{lineno}: expected 'query-id corpus-id score' (BEIR) or "
                                       f"'qid 0 docid rel' (TREC), got {len(fields)} columns")
            try:
                rel = float(v)
            except ValueError:
                if first and (v.lower() in _QRELS_HEADER or q.lower() in _QRELS_HEADER):
                    first = False
                    continue
                raise CorruptFileError(f"{path}:{lineno}: relevance {v!r} is not a number") from None
            first = False
            out.setdefault(q.strip(), {})[d.strip()] = rel
    return out


def load_queries(queries: Any) -> Dict[str, str]:
    """Queries given as a file path (:func:`read_queries`), a ``{id: text}`` mapping or ``(id, text)`` pairs."""
    if isinstance(queries, (str, os.PathLike)):
        return read_queries(queries)
    if isinstance(queries, Mapping):
        return {str(k): str(v) for k, v in queries.items()}
    return {str(a): str(b) for a, b in queries}


def load_qrels(qrels: Any) -> Dict[str, Dict[str, float]]:
    """Qrels given as a file path (:func:`read_qrels`), a ``{qid: {doc_id: rel}}`` mapping or
    ``(qid, doc_id, rel)`` triples."""
    if isinstance(qrels, (str, os.PathLike)):
        return read_qrels(qrels)
    if isinstance(qrels, Mapping):
        return {str(q): {str(d): float(v) for d, v in dict(docs).items()} for q, docs in qrels.items()}
    out: Dict[str, Dict[str, float]] = {}
    for q, d, v in qrels:
        out.setdefault(str(q), {})[str(d)] = float(v)
    return out


def read_beir(root: PathLike, split: str = "test") -> BeirData:
    """Read ``root/corpus.jsonl``, ``root/queries.jsonl`` and ``root/qrels/<split>.tsv``."""
    root = Path(root)
    return BeirData(
        corpus=read_beir_corpus(root / "corpus.jsonl"),
        queries=read_beir_queries(root / "queries.jsonl"),
        qrels=read_qrels(root / "qrels" / f"{split}.tsv"),
    )


# --------------------------------------------------------------------------- documents

#: Extensions :func:`read_documents` ingests (``.pdf`` needs the ``pdf`` extra).
TEXT_EXTENSIONS = (".txt", ".md", ".markdown", ".rst")
JSONL_EXTENSIONS = (".jsonl",)
PDF_EXTENSIONS = (".pdf",)
_JSONL_TEXT_KEYS = ("text", "contents", "content", "page_content", "body")
_JSONL_ID_KEYS = ("id", "_id", "doc_id", "docid")


@dataclass
class ReadReport:
    """What :func:`read_documents` found."""

    files: int = 0  #: files read
    documents: int = 0  #: documents produced
    skipped_empty: int = 0  #: empty files, JSONL rows without text
    unreadable: List[str] = field(default_factory=list)  #: "path: reason"
    replaced_characters: List[str] = field(default_factory=list)  #: non-UTF-8 files decoded with U+FFFD
    ignored: int = 0  #: files with other extensions found while walking directories
    special: List[str] = field(default_factory=list)  #: FIFOs, sockets, devices skipped while walking

    def lines(self) -> List[str]:
        out = [f"read {self.files} file(s): {self.documents} document(s)"]
        if self.skipped_empty:
            out.append(f"skipped {self.skipped_empty} empty document(s)")
        if self.replaced_characters:
            out.append(f"{len(self.replaced_characters)} file(s) were not valid UTF-8 and were decoded with replacement characters: "
                       + ", ".join(self.replaced_characters))
        for u in self.unreadable:
            out.append(f"skipped unreadable {u}")
        if self.ignored:
            out.append(f"ignored {self.ignored} file(s) with other extensions")
        if self.special:
            out.append(f"skipped {len(self.special)} special file(s) (not regular files): " + ", ".join(self.special))
        return out


def read_documents(paths: Iterable[PathLike], *, root_relative_ids: bool = True) -> Tuple[List[Passage], ReadReport]:
    """Read ``.txt``/``.md``/``.rst`` files (one document each), ``.jsonl`` files (one per row:
    ``text``/``contents``, optional ``title``, ``id``/``_id`` and ``metadata``) and ``.pdf``
    (one per page, with the ``pdf`` extra). Directories are walked recursively in sorted
    order; hidden entries are skipped, and so are entries that are not regular files (FIFOs,
    sockets, devices: reported, never opened, so a FIFO cannot block indexing). A FIFO named
    directly (e.g. ``<(command)``) is read.

    Document ids are stable: the path relative to the directory given (or the file name for
    a file given directly), plus ``:<row id>`` for JSONL rows and ``:p<page>`` for PDF pages.
    ``metadata["source"]`` is the file path. Empty documents are counted and skipped; files
    that cannot be read are reported by name and skipped; bytes that are not UTF-8 are
    replaced with U+FFFD and the file is reported (and logged as a warning).
    """
    report = ReadReport()
    docs: List[Passage] = []
    for given in paths:
        given = Path(given)
        if given.is_dir():
            for f in sorted(_walk(given)):
                if f.suffix.lower() not in TEXT_EXTENSIONS + JSONL_EXTENSIONS + PDF_EXTENSIONS:
                    report.ignored += 1
                    continue
                kind = _special_kind(f)
                if kind:
                    report.special.append(f"{f} ({kind})")
                    logger.warning("skipped %s: a %s, not a regular file", f, kind)
                    continue
                _read_one(f, f.relative_to(given).as_posix() if root_relative_ids else f.as_posix(), docs, report)
        elif given.exists():
            _read_one(given, given.name if root_relative_ids else given.as_posix(), docs, report)
        else:
            report.unreadable.append(f"{given}: no such file or directory")
            logger.warning("skipped %s: no such file or directory", given)
    report.documents = len(docs)
    return docs, report


def _walk(root: Path) -> Iterable[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith("."):
                yield Path(dirpath) / name


def _special_kind(path: Path) -> Optional[str]:
    """What ``path`` (symlinks followed) is when it is not a regular file; None for a regular
    file or one that cannot be stat'ed (its read then reports why)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "special file"


def _read_text(path: Path, report: ReadReport) -> Optional[str]:
    try:
        raw = path.read_bytes()
    except OSError as e:
        report.unreadable.append(f"{path}: {e.strerror or e}")
        logger.warning("skipped unreadable file %s: %s", path, e.strerror or e)
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        report.replaced_characters.append(str(path))
        logger.warning("%s is not valid UTF-8; undecodable bytes were replaced with U+FFFD", path)
    return text.lstrip("\ufeff")


def _read_one(path: Path, doc_id: str, docs: List[Passage], report: ReadReport) -> None:
    ext = path.suffix.lower()
    src = str(path)
    if ext in PDF_EXTENSIONS:
        _read_pdf(path, doc_id, docs, report)
        return
    text = _read_text(path, report)
    if text is None:
        return
    report.files += 1
    if ext in JSONL_EXTENSIONS:
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                report.unreadable.append(f"{path}:{lineno}: not valid JSON ({e.msg})")
                logger.warning("skipped %s:%d: not valid JSON (%s)", path, lineno, e.msg)
                continue
            if not isinstance(row, dict):
                report.unreadable.append(f"{path}:{lineno}: not a JSON object")
                continue
            body = next((row[k] for k in _JSONL_TEXT_KEYS if isinstance(row.get(k), str)), "")
            title = row.get("title") if isinstance(row.get("title"), str) else ""
            full = f"{title}\n{body}" if title and body else (body or "")
            if not full.strip():
                report.skipped_empty += 1
                continue
            rid = next((row[k] for k in _JSONL_ID_KEYS if row.get(k) is not None), lineno)
            meta = dict(row["metadata"]) if isinstance(row.get("metadata"), dict) else {}
            meta.update(source=src, line=lineno)
            if title:
                meta["title"] = title
            docs.append(Passage(text=full, id=f"{doc_id}:{rid}", metadata=meta))
        return
    if not text.strip():
        report.skipped_empty += 1
        return
    docs.append(Passage(text=text, id=doc_id, metadata={"source": src}))


def _read_pdf(path: Path, doc_id: str, docs: List[Passage], report: ReadReport) -> None:
    try:
        from pypdf import PdfReader
    except ImportError:
        report.unreadable.append(f"{path}: PDF support needs the pdf extra (pip install 'nbce-rag[pdf]')")
        logger.warning("skipped %s: PDF support needs pip install 'nbce-rag[pdf]'", path)
        return
    try:
        reader = PdfReader(str(path))
        pages = [(p.extract_text() or "") for p in reader.pages]
    except Exception as e:  # noqa: BLE001 - pypdf raises many types on damaged files
        report.unreadable.append(f"{path}: {type(e).__name__}: {e}")
        logger.warning("skipped unreadable PDF %s: %s", path, e)
        return
    report.files += 1
    for n, page in enumerate(pages, 1):
        if not page.strip():
            report.skipped_empty += 1
            continue
        docs.append(Passage(text=page, id=f"{doc_id}:p{n}", metadata={"source": str(path), "page": n}))


# --------------------------------------------------------------------------- helpers


def _open_text(path: Path) -> io.TextIOWrapper:
    try:
        return open(path, "r", encoding="utf-8", errors="replace", newline="")
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist") from None


def _iter_jsonl(path: Path, *, objects_only: bool = True) -> Iterable[Tuple[int, Any]]:
    """``(line number, row)`` of every non-empty line; a row must be a JSON object unless
    ``objects_only`` is False (pair files also take ``[text1, text2, score]`` rows)."""
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorruptFileError(f"{path}:{lineno}: not valid JSON ({e})") from None
            if objects_only and not isinstance(row, dict):
                raise CorruptFileError(f"{path}:{lineno}: expected a JSON object")
            yield lineno, row
