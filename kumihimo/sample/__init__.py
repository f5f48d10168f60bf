"""The bundled bilingual sample corpus used by ``kumihimo quickstart`` and the tests.

Files (regenerate with ``python -m kumihimo.sample.make_corpus``; see README.md in this folder):

* ``ja.jsonl.gz`` -- Japanese web-like documents plus planted dirt
* ``en.jsonl.gz`` -- English web-like documents plus planted dirt
* ``eval.jsonl``  -- a tiny question/passage "evaluation set" used for decontamination
* ``web_pages.write_sample_warc(path)`` -- a small Common Crawl-like ``.warc.gz`` written at run time
  (Japanese pages in three encodings, English pages, an image, a truncated record)

Each corpus line is ``{"id": ..., "text": ..., "url": ...}``.
"""

from pathlib import Path

SAMPLE_DIR = Path(__file__).resolve().parent

__all__ = ["SAMPLE_DIR", "sample_paths"]


def sample_paths() -> dict[str, Path]:
    """Paths of the shipped sample files: keys ``ja``, ``en`` (gzipped JSONL) and ``eval`` (JSONL)."""
    return {
        "ja": SAMPLE_DIR / "ja.jsonl.gz",
        "en": SAMPLE_DIR / "en.jsonl.gz",
        "eval": SAMPLE_DIR / "eval.jsonl",
    }
