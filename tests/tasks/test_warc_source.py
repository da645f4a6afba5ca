"""Web archives, Hugging Face datasets and weighted mixes as sources.

The WARC and WET files are written here with warcio (the writer the crawler archives
with); forgeline reads them with FastWARC.
"""

import io
from pathlib import Path

import pytest
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from tasks.charset import decode
from tasks.extract import ExtractConfig, extract_text
from tasks.shards import iter_records
from tasks.sources import SourceConfig, ingest_local, mix_counts
from tasks.stage import StageInputError

PROSE = ("The river town kept its old stone bridge, and every spring the market filled the "
         "square with bread, cheese and early vegetables from the valley farms. ")
RUSSIAN = ("Старый мост через реку стоит уже триста лет, и каждую весну на площади "
           "открывается рынок с хлебом, сыром и овощами из долины. ")


def html(title: str, body: str) -> str:
    return (f"<html><head><title>{title}</title></head><body><nav>Home | About</nav>"
            f"<article><h1>{title}</h1><p>{body * 4}</p><p>{body * 3}</p></article>"
            "<footer>Copyright</footer></body></html>")


def response(writer: WARCWriter, url: str, status: str, headers: list, body: bytes) -> str:
    http = StatusAndHeaders(status, headers, protocol="HTTP/1.1")
    record = writer.create_warc_record(url, "response", payload=io.BytesIO(body),
                                       http_headers=http)
    writer.write_record(record)
    return record.rec_headers.get_header("WARC-Record-ID")


def write_warc(path: Path) -> dict[str, str]:
    """A small crawl's archive: two HTML pages (one in windows-1251 without a declared
    charset), a redirect, an image, a 404 and a request record. Returns url -> record id."""
    ids = {}
    with open(path, "wb") as out:
        writer = WARCWriter(out, gzip=path.name.endswith(".gz"))
        request = writer.create_warc_record(
            "http://example.test/a", "request", payload=io.BytesIO(b""),
            http_headers=StatusAndHeaders("GET /a HTTP/1.1", [("Host", "example.test")],
                                          is_http_request=True))
        writer.write_record(request)
        ids["http://example.test/a"] = response(
            writer, "http://example.test/a", "200 OK",
            [("Content-Type", "text/html; charset=utf-8")], html("Bridge", PROSE).encode())
        response(writer, "http://example.test/old", "301 Moved Permanently",
                 [("Location", "http://example.test/a"), ("Content-Type", "text/html")], b"")
        response(writer, "http://example.test/logo.png", "200 OK",
                 [("Content-Type", "image/png")], b"\x89PNG\r\n\x1a\n" + bytes(200))
        response(writer, "http://example.test/missing", "404 Not Found",
                 [("Content-Type", "text/html")], html("Missing", PROSE).encode())
        ids["http://example.test/ru"] = response(
            writer, "http://example.test/ru", "200 OK", [("Content-Type", "text/html")],
            html("Мост", RUSSIAN).encode("cp1251"))
    return ids


def write_wet(path: Path) -> dict[str, str]:
    ids = {}
    with open(path, "wb") as out:
        writer = WARCWriter(out, gzip=True)
        for n in range(2):
            url = f"http://example.test/wet/{n}"
            record = writer.create_warc_record(
                url, "conversion", payload=io.BytesIO(f"Plain page {n}. {PROSE * 3}".encode()),
                warc_content_type="text/plain")
            writer.write_record(record)
            ids[url] = record.rec_headers.get_header("WARC-Record-ID")
    return ids


def read(out: Path, folder: str = "data") -> dict[str, dict]:
    return {r["url"]: r for r in iter_records(out / folder)}


def test_warc_and_wet_files_become_documents_with_their_record_metadata(tmp_path):
    warc_ids = write_warc(tmp_path / "crawl.warc.gz")
    wet_ids = write_wet(tmp_path / "crawl.wet.gz")
    out = tmp_path / "ingested"
    result = ingest_local(SourceConfig(paths=[str(tmp_path / "crawl.*.gz")], name="cc"), out)

    docs = read(out)
    assert set(docs) == set(warc_ids) | set(wet_ids)  # no redirect, image, 404 or request
    page = docs["http://example.test/a"]
    assert page["id"] == page["warc_record_id"] == warc_ids["http://example.test/a"]
    assert page["content_type"] == "text/html" and "<article>" in page["text"]
    assert page["fetched_at"].startswith("20") and page["source"] == "cc"
    assert page["source_file"] == str((tmp_path / "crawl.warc.gz").resolve())
    # an undeclared windows-1251 page is sniffed, not mangled
    assert "Старый мост" in docs["http://example.test/ru"]["text"]
    wet = docs["http://example.test/wet/1"]
    assert wet["content_type"] == "text/plain" and wet["text"].startswith("Plain page 1.")
    assert wet["id"] == wet_ids["http://example.test/wet/1"]

    stats = result["stats"]
    assert result["count"] == 4
    assert stats["warc_documents"] == 2 and stats["wet_documents"] == 2
    assert (stats["warc_redirects"], stats["warc_non_text"], stats["warc_http_errors"]) == (1, 1, 1)
    assert stats["charset_sniffed"] == 1 and stats["source.cc.documents"] == 4

    # HTML responses go on to extraction; the WET text is passed through as it is
    extracted = tmp_path / "extracted"
    extract_text(ExtractConfig(), out / "data", extracted)
    texts = read(extracted)
    assert "Home | About" not in texts["http://example.test/a"]["text"]
    assert "stone bridge" in texts["http://example.test/a"]["text"]
    assert "Старый мост" in texts["http://example.test/ru"]["text"]
    assert texts["http://example.test/wet/0"]["text"] == f"Plain page 0. {PROSE * 3}".strip()
    assert texts["http://example.test/a"]["warc_record_id"] == warc_ids["http://example.test/a"]


def test_an_uncompressed_warc_in_a_folder_is_found_by_extension(tmp_path):
    folder = tmp_path / "archives"
    folder.mkdir()
    write_warc(folder / "part.warc")
    (folder / "notes.md").write_text("not a source")
    result = ingest_local(SourceConfig(paths=[str(folder)]), tmp_path / "out")
    assert result["count"] == 2 and result["stats"]["ignored_files"] == 1


def test_an_archive_without_text_records_is_a_clear_error(tmp_path):
    with open(tmp_path / "images.warc.gz", "wb") as out:
        response(WARCWriter(out, gzip=True), "http://example.test/x.png", "200 OK",
                 [("Content-Type", "image/png")], b"\x89PNG" + bytes(50))
    with pytest.raises(StageInputError, match="warc_non_text: 1"):
        ingest_local(SourceConfig(paths=[str(tmp_path / "images.warc.gz")]), tmp_path / "out")


def test_charset_declared_then_meta_then_sniffed_then_counted_fallback():
    german = "Grüße aus Köln: die Straße am Fluss ist schön. " * 3
    assert decode(german.encode("cp1252"), "text/html; charset=ISO-8859-1").method == "declared"
    assert decode(german.encode("cp1252"), "text/html; charset=ISO-8859-1").text == german
    meta = b'<meta charset="koi8-r"><p>' + "Привет, мир".encode("koi8-r")
    assert decode(meta, "text/html").text.endswith("Привет, мир")
    assert decode(meta, "text/html").method == "meta"
    sniffed = decode((RUSSIAN * 2).encode("cp1251"), "text/html")
    assert (sniffed.method, sniffed.text) == ("sniffed", RUSSIAN * 2)
    broken = decode(b"ok " * 50 + b"\xff", "text/plain; charset=utf-8")
    assert (broken.method, broken.errors) == ("declared", 1) and broken.text.endswith("\ufffd")
    noise = decode(bytes(range(128, 256)) * 4, "")
    assert noise.method == "fallback" and noise.errors > 0  # counted, never raised


def test_a_hugging_face_dataset_saved_locally_is_streamed_with_its_ids(tmp_path):
    import datasets

    rows = {"doc": [f"row-{i}" for i in range(30)], "body": [f"{PROSE} {i}" for i in range(30)],
            "link": [f"https://data.test/{i}" for i in range(30)]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "files").mkdir()
    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "files" / "train.parquet"))
    for name, location in (("saved", tmp_path / "saved"), ("files", tmp_path / "files")):
        config = SourceConfig(datasets=[{
            "name": name, "dataset": str(location), "text_column": "body", "id_column": "doc",
            "url_column": "link", "max_documents": 25}])
        out = tmp_path / f"out-{name}"
        result = ingest_local(config, out)
        docs = {r["id"]: r for r in iter_records(out / "data")}
        assert result["count"] == 25 and sorted(docs) == sorted(rows["doc"][:25])
        assert docs["row-3"]["text"] == f"{PROSE} 3" and docs["row-3"]["url"] == "https://data.test/3"
        assert docs["row-3"]["source"] == name and docs["row-3"]["content_type"] == "text/plain"

    bad = SourceConfig(datasets=[{"name": "x", "dataset": str(tmp_path / "files"),
                                  "text_column": "content"}])
    with pytest.raises(StageInputError, match="'content'"):
        ingest_local(bad, tmp_path / "bad")


def test_weighted_sources_are_mixed_deterministically_and_nothing_is_lost(tmp_path):
    for name, count in (("big", 200), ("small", 50)):
        folder = tmp_path / name
        folder.mkdir()
        for i in range(count):
            (folder / f"{name}{i}.txt").write_text(f"{name} document {i}")
    config = SourceConfig(files=[{"name": "big", "paths": [str(tmp_path / "big")], "weight": 1},
                                 {"name": "small", "paths": [str(tmp_path / "small")],
                                  "weight": 1}])
    first = ingest_local(config, tmp_path / "a")
    again = ingest_local(config, tmp_path / "b")
    kept = {r["id"]: r["source"] for r in iter_records(tmp_path / "a" / "data")}
    removed = list(iter_records(tmp_path / "a" / "removed"))
    assert kept == {r["id"]: r["source"] for r in iter_records(tmp_path / "b" / "data")}
    assert first["count"] == again["count"] == len(kept)
    assert len(kept) + len(removed) == 250 and {r["reason"] for r in removed} == {"mix"}
    per_source = {s: sum(v == s for v in kept.values()) for s in ("big", "small")}
    assert per_source == {"big": 50, "small": 50}  # equal weights; small keeps everything
    assert first["stats"]["source.big.read"] == 200
    assert first["stats"]["source.big.documents"] == per_source["big"]
    assert mix_counts({"a": 100, "b": 100}, {"a": 3, "b": 1}) == {"a": 100, "b": 33}
    assert mix_counts({"a": 41, "b": 2}, {"a": 4, "b": 1}) == {"a": 8, "b": 2}


def raw_record(uri: str, block: bytes, *, record_id: str | None = "<urn:uuid:1>",
               eol: bytes = b"\r\n", kind: str = "response") -> bytes:
    """One uncompressed WARC record written by hand (for what warcio will not write)."""
    lines = [b"WARC/1.0", f"WARC-Type: {kind}".encode(), f"WARC-Target-URI: {uri}".encode(),
             b"WARC-Date: 2026-01-02T03:04:05Z",
             b"Content-Type: application/http; msgtype=response",
             f"Content-Length: {len(block)}".encode()]
    if record_id:
        lines.insert(2, f"WARC-Record-ID: {record_id}".encode())
    return eol.join(lines) + eol + eol + block + eol + eol


def http(status: bytes, body: bytes, *headers: bytes) -> bytes:
    return b"\r\n".join([b"HTTP/1.1 " + status, b"Content-Type: text/html", *headers]) + \
        b"\r\n\r\n" + body


def test_odd_and_broken_archives_are_counted_or_named_never_a_traceback(tmp_path):
    import gzip

    page = b"<html><body><p>" + PROSE.encode() * 3 + b"</p></body></html>"
    archive = tmp_path / "odd.warc"
    archive.write_bytes(
        raw_record("http://e.test/bad-status", http(b"abc", page), record_id="<urn:uuid:a>")
        + raw_record("http://e.test/no-id-1", http(b"200 OK", page), record_id=None)
        + raw_record("http://e.test/no-id-2", http(b"200 OK", page), record_id=None)
        + raw_record("http://e.test/gzipped", http(b"200 OK", gzip.compress(page),
                                                   b"Content-Encoding: gzip"),
                     record_id="<urn:uuid:c>")
        + raw_record("http://e.test/video", b"HTTP/1.1 200 OK\r\nContent-Type: video/mp4\r\n\r\n"
                     + bytes(300_000), record_id="<urn:uuid:d>")
        + raw_record("http://e.test/huge", http(b"200 OK", page * 200), record_id="<urn:uuid:e>"))
    # the same file named twice (a folder and a glob) is read once
    config = SourceConfig(paths=[str(tmp_path), str(tmp_path / "*.warc")],
                          max_record_bytes=50_000)
    result = ingest_local(config, tmp_path / "out")
    docs = read(tmp_path / "out")
    assert set(docs) == {f"http://e.test/{p}" for p in ("no-id-1", "no-id-2", "gzipped")}
    assert docs["http://e.test/gzipped"]["text"] == page.decode()  # stored compressed
    made = [docs[f"http://e.test/no-id-{n}"]["id"] for n in (1, 2)]
    assert made[0] != made[1] and all(i.startswith("<urn:forgeline:") for i in made)
    stats = result["stats"]
    assert (stats["warc_malformed"], stats["warc_non_text"], stats["warc_too_large"]) == (1, 1, 1)
    assert stats["input_files"] == 1

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "fake.warc.gz").write_bytes(b"this is not an archive\n" * 20)
    with pytest.raises(StageInputError, match="fake.warc.gz is not a readable WARC/WET file"):
        ingest_local(SourceConfig(paths=[str(tmp_path / "broken")]), tmp_path / "out2")
    # header lines ending in LF alone are not WARC: named, after the records before them
    (tmp_path / "lf.warc").write_bytes(
        raw_record("http://e.test/ok", http(b"200 OK", page))
        + raw_record("http://e.test/lf", http(b"200 OK", page), record_id="<urn:uuid:f>",
                     eol=b"\n"))
    with pytest.raises(StageInputError, match="lf.warc is not a readable WARC/WET file after 1"):
        ingest_local(SourceConfig(paths=[str(tmp_path / "lf.warc")]), tmp_path / "out3")


def test_a_weighted_source_without_documents_stops_the_run_by_name(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"id": "1", "text": "one"}\n{"id": "2", "text": "two"}\n')
    (tmp_path / "b.jsonl").write_text("\n")
    config = SourceConfig(paths=[str(tmp_path / "a.jsonl")], weight=3,
                          files=[{"name": "empty", "paths": [str(tmp_path / "b.jsonl")],
                                  "weight": 1}])
    with pytest.raises(StageInputError, match=r"\['empty'\] have no documents"):
        ingest_local(config, tmp_path / "out")


def test_a_recursive_glob_names_txt_documents_by_their_path_under_the_glob(tmp_path):
    for folder in ("a", "b/c"):
        (tmp_path / "docs" / folder).mkdir(parents=True)
        (tmp_path / "docs" / folder / "README.txt").write_text(f"readme of {folder}")
    result = ingest_local(SourceConfig(paths=[str(tmp_path / "docs" / "**" / "*.txt")]),
                          tmp_path / "out")
    ids = {r["id"] for r in iter_records(tmp_path / "out" / "data")}
    assert result["count"] == 2 and ids == {"a/README.txt", "b/c/README.txt"}


def test_mostly_ascii_legacy_pages_are_not_mangled():
    french = "Café crème brûlée, garçon! À côté, une crêperie où tout est très bien."
    for text in (french, "Café crème brûlée, garçon!"):
        decoded = decode(text.encode("latin-1"), "text/html")
        assert decoded.text == text and decoded.errors == 0
    assert decode(b'<meta charset="utf-16"><p>hello</p>', "text/html").text.endswith("hello</p>")
    polish = "Zażółć gęślą jaźń, to jest polski tekst w kodowaniu windows."
    assert decode(polish.encode("cp1250"), "").text == polish
