"""The data report's tables: the per-source mix and the filter's languages."""

from flows.report import data_report


def test_the_source_table_keeps_dotted_names_and_shows_what_was_read(tmp_path):
    stages = {
        "crawl": {"count": 5, "dir": str(tmp_path), "stats": {
            "source.cc.2024.read": 9, "source.cc.2024.documents": 3,
            "source.cc.2023.read": 4, "source.cc.2023.documents": 2}},
        "extract": {"count": 4, "dir": str(tmp_path), "stats": {
            "input_documents": 5, "source.cc.2024.documents": 3, "source.cc.2024.words": 1200,
            "source.cc.2023.documents": 1, "source.cc.2023.words": 300}},
        "filter": {"count": 3, "dir": str(tmp_path), "stats": {
            "input_documents": 4, "language_en": 3, "language_de": 1,
            "source.cc.2024.documents": 3, "source.cc.2024.words": 1100}},
    }
    text = data_report(stages, tmp_path / "report")["report"].read_text()
    assert "| source | read | crawl | extract | filter |" in text
    assert "| cc.2023 | 4 | 2 | 1 (300) |  |" in text
    assert "| cc.2024 | 9 | 3 | 3 (1,200) | 3 (1,100) |" in text
    assert "| en | 3 |" in text and "| de | 1 |" in text
