"""Check that `kumihimo data tokenize` with a Hugging Face tokenizer folder writes the .bin/.idx that
Megatron-LM's tools/preprocess_data.py writes with `--tokenizer-type HuggingFaceTokenizer --append-eod`,
byte for byte, and compare their speed.

    python benchmarks/check_preprocess_data_hf.py [--megatron-lm GIT_DIR] [--ref REF] [--tokenizer DIR]
        [--mb 5] [--workers 2] [--keep DIR]

preprocess_data.py is taken from a git checkout (or bare mirror) of NVIDIA/Megatron-LM at REF (default:
the tag of the installed megatron-core release, core_v<version>, else the newest core_v tag of the same
minor release) and run with the installed megatron-core and transformers. The input is the web-like
JSONL of bench_data_prep_corpus.py (Japanese and English lines, one file); the tokenizer is DIR, or a
byte-level BPE (16k pieces, a Llama-like template that starts every text with <s>) trained on that
corpus with the `tokenizers` library. Both tools get the same JSONL and worker count; the .bin and .idx
are compared by SHA-256 and the wall time of each is printed. Exits 1 if either file differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_data_prep_corpus import make_corpus  # noqa: E402

from kumihimo.data_prep.indexed import read_index  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MIRROR = Path("/work/.mirror/NVIDIA+Megatron-LM/repo")
SCRIPT = "tools/preprocess_data.py"


def git(git_dir: Path, *args: str) -> bytes:
    return subprocess.run(["git", f"--git-dir={git_dir}", *args], check=True, capture_output=True).stdout


def resolve_git_dir(path: Path) -> Path:
    return path / ".git" if (path / ".git").exists() else path


def default_ref(git_dir: Path) -> str:
    """core_v<installed megatron-core version>, else the newest core_v tag of its minor release, else HEAD."""
    from importlib.metadata import version

    installed = version("megatron-core").split("+")[0]
    tags = git(git_dir, "tag", "--list", "core_v*").decode().split()
    if f"core_v{installed}" in tags:
        return f"core_v{installed}"
    minor = ".".join(installed.split(".")[:2])
    same_minor = sorted(
        (t for t in tags if t.removeprefix("core_v").startswith(minor + ".")),
        key=lambda t: [int(p) if p.isdigit() else -1 for p in t.removeprefix("core_v").split(".")],
    )
    return same_minor[-1] if same_minor else "HEAD"


def extract_script(git_dir: Path, ref: str, target: Path) -> Path:
    """tools/preprocess_data.py of `ref` under `target` (the script appends its parent's parent to sys.path;
    with no megatron/ there, the installed megatron-core is what it imports)."""
    archive = git(git_dir, "archive", "--format=tar", ref, SCRIPT)
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")
    return target / SCRIPT


def train_tokenizer(corpus: Path, folder: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    def texts():
        with open(corpus, encoding="utf-8") as handle:
            for line in handle:
                yield json.loads(line)["text"]

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=16000,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts(), trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    ).save_pretrained(folder)
    return folder


def run_megatron(script: Path, corpus: Path, tokenizer: Path, out: Path, workers: int) -> tuple[Path, float]:
    out.mkdir(parents=True)
    command = [
        sys.executable,
        str(script),
        "--input",
        str(corpus),
        "--output-prefix",
        str(out / "megatron"),
        "--tokenizer-type",
        "HuggingFaceTokenizer",
        "--tokenizer-model",
        str(tokenizer),
        "--json-keys",
        "text",
        "--append-eod",
        "--workers",
        str(workers),
        "--log-interval",
        "1000000",
    ]
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"preprocess_data.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return out / "megatron_text_document", elapsed


def run_kumihimo(corpus: Path, tokenizer: Path, out: Path, workers: int) -> tuple[Path, float]:
    """`data tokenize` of one source whose curated JSONL is the corpus, in a fresh process (as the CLI runs)."""
    code = f"""
import shutil, sys
from pathlib import Path
from kumihimo.data_prep.config import DataPrepConfig, SourceConfig
from kumihimo.data_prep.pipeline import build_datasets
out = Path({str(out)!r})
(out / "curated").mkdir(parents=True)
shutil.copyfile({str(corpus)!r}, out / "curated" / "corpus.jsonl")
config = DataPrepConfig(output_dir=str(out), num_workers={workers})
config.input.sources = [SourceConfig(name="corpus", paths=[{str(corpus)!r}])]
print(build_datasets(config, {str(tokenizer)!r}).prefixes["corpus"])
"""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"kumihimo data tokenize failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return Path(proc.stdout.strip().splitlines()[-1]), elapsed


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--megatron-lm", type=Path, default=DEFAULT_MIRROR, help="Megatron-LM checkout or git dir"
    )
    parser.add_argument("--ref", default=None, help="git ref of preprocess_data.py (default: see above)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="Hugging Face tokenizer folder to use")
    parser.add_argument("--mb", type=float, default=5.0, help="corpus size in MB of JSONL (default 5)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes of both tools (default 2)")
    parser.add_argument(
        "--keep", type=Path, default=None, help="write everything here (new folder) and keep it"
    )
    args = parser.parse_args()
    git_dir = resolve_git_dir(args.megatron_lm)
    if not (git_dir / "HEAD").is_file():
        parser.error(f"--megatron-lm={args.megatron_lm} is not a git checkout or git dir of Megatron-LM")
    if args.keep is not None and args.keep.exists():
        parser.error(f"--keep={args.keep} exists; give a new folder")
    ref = args.ref or default_ref(git_dir)
    with tempfile.TemporaryDirectory(prefix="preprocess_data_hf_") as tmp:
        work = (args.keep or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        script = extract_script(git_dir, ref, work / "megatron-lm")
        paths = make_corpus(work / "corpus", args.mb)
        corpus = work / "corpus.jsonl"
        with open(corpus, "wb") as handle:
            for path in paths.values():
                handle.write(path.read_bytes())
        tokenizer = (
            args.tokenizer.resolve() if args.tokenizer else train_tokenizer(corpus, work / "tokenizer")
        )
        size_mb = corpus.stat().st_size / 1e6
        print(f"preprocess_data.py at {ref} ({git_dir}); {size_mb:.1f} MB of JSONL; tokenizer {tokenizer}")
        print(f"workers: {args.workers} each", flush=True)
        megatron_prefix, megatron_s = run_megatron(script, corpus, tokenizer, work / "megatron", args.workers)
        ours_prefix, ours_s = run_kumihimo(corpus, tokenizer, work / "kumihimo", args.workers)
        num_tokens = int(read_index(ours_prefix)[1].sum())
        different = []
        for suffix in (".bin", ".idx"):
            theirs, ours = Path(f"{megatron_prefix}{suffix}"), Path(f"{ours_prefix}{suffix}")
            same = sha256(theirs) == sha256(ours)
            print(
                f"{suffix}: {'identical' if same else 'DIFFERENT'} ({ours.stat().st_size} vs {theirs.stat().st_size} bytes)"
            )
            if not same:
                different.append(suffix)
        for label, seconds in (("preprocess_data.py", megatron_s), ("kumihimo data tokenize", ours_s)):
            print(
                f"{label}: {seconds:.1f} s wall ({size_mb / seconds:.2f} MB/s, "
                f"{num_tokens / seconds / 1e3:.0f}k tokens/s; process start included)"
            )
    print("IDENTICAL" if not different else f"DIFFERENT: {', '.join(different)}")
    sys.exit(1 if different else 0)


if __name__ == "__main__":
    main()
