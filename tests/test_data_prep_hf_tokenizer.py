"""`kumihimo data tokenize` with a Hugging Face tokenizer folder (tokenizer.json) instead of SentencePiece.

Tiny byte-level BPE tokenizers are trained here on a few Japanese lines with the `tokenizers` library
and saved by PreTrainedTokenizerFast.save_pretrained: one whose template starts every text with <s>
(as Llama's does) and one with no BOS at all (as Qwen's). The .bin/.idx, read back by Megatron's
IndexedDataset, must hold exactly transformers' AutoTokenizer ids of each document (its own special
tokens included, as Megatron's preprocess_data with HuggingFaceTokenizer encodes) plus the eos id.
Byte identity with preprocess_data itself is checked by benchmarks/check_preprocess_data_hf.py.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from kumihimo.core.errors import UserError
from kumihimo.data_prep.blend import read_blend
from kumihimo.data_prep.config import DataPrepConfig, SourceConfig
from kumihimo.data_prep.indexed import read_index
from kumihimo.data_prep.pipeline import build_datasets
from kumihimo.tokenizer.base import Tokenizer, load_tokenizer
from kumihimo.tokenizer.hf import HFTokenizer
from kumihimo.tokenizer.spm import SentencePieceTokenizer

LINES = [
    "吾輩は猫である。名前はまだ無い。",
    "どこで生れたかとんと見当がつかぬ。",
    "何でも薄暗いじめじめした所でニャーニャー泣いていた事だけは記憶している。",
    "東京都の天気は晴れ、最高気温は二十五度でした。",
    "機械学習のモデルを日本語のコーパスで事前学習する。",
    "Megatron-Core で大規模言語モデルを学習します。",
]


def make_hf_tokenizer(folder: Path, with_bos: bool) -> Path:
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tokenizer = RustTokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(LINES * 3, trainer)
    if with_bos:
        bos = tokenizer.token_to_id("<s>")
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
        )
    names = dict(unk_token="<unk>", eos_token="</s>", pad_token="<pad>")
    if with_bos:
        names["bos_token"] = "<s>"
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, **names).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_tokenizers")
    return {name: make_hf_tokenizer(root / name, name == "bos") for name in ("bos", "no_bos")}


def write_curated(root: Path, texts_by_source: dict[str, list[str]], num_workers: int) -> DataPrepConfig:
    """A config whose curated JSONL is already there (tokenize reads only that)."""
    config = DataPrepConfig(output_dir=str(root / "out"), num_workers=num_workers)
    config.input.sources = [
        SourceConfig(name=name, paths=[str(root / "unused.jsonl")]) for name in texts_by_source
    ]
    curated = root / "out" / "curated"
    curated.mkdir(parents=True)
    for name, texts in texts_by_source.items():
        lines = [json.dumps({"text": t, "id": i}, ensure_ascii=False) for i, t in enumerate(texts)]
        (curated / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return config


# Two spawned workers import transformers each (~15 s on 2 cores): the multi-process case is slow.
@pytest.mark.parametrize(
    "name, num_workers", [pytest.param("bos", 2, marks=pytest.mark.slow), ("no_bos", 1), ("bos", 1)]
)
def test_datasets_hold_autotokenizer_ids_plus_eos(tokenizers, tmp_path, name, num_workers, capsys):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoTokenizer

    texts = {"ja": LINES * 40, "mixed": [line + " " + LINES[-1] for line in LINES]}
    config = write_curated(tmp_path, texts, num_workers)
    result = build_datasets(config, tokenizers[name])
    assert "tokenize.add_bos is not applied" in capsys.readouterr().err
    reference = AutoTokenizer.from_pretrained(tokenizers[name], local_files_only=True)
    eos = reference.convert_tokens_to_ids("</s>")
    for source, source_texts in texts.items():
        expected = [[*reference(t).input_ids, eos] for t in source_texts]
        starts_with_bos = {ids[0] == reference.convert_tokens_to_ids("<s>") for ids in expected}
        assert starts_with_bos == {name == "bos"}
        dataset = IndexedDataset(str(result.prefixes[source]))
        assert len(dataset) == len(expected)
        assert [dataset[i].tolist() for i in range(len(dataset))] == expected
        assert dataset.document_indices.tolist() == list(range(len(expected) + 1))
        assert read_index(result.prefixes[source])[0] == np.uint16
        assert result.num_tokens[source] == sum(map(len, expected))
    _pairs, identity = read_blend(result.blend_path)
    loaded = HFTokenizer(tokenizers[name])
    assert identity["kind"] == "huggingface" and identity["sha256"] == loaded.sha256
    assert identity["vocab_size"] == len(reference) and identity["eod_id"] == eos


def test_tokenizer_kind_is_chosen_by_the_files(tokenizers, tmp_path):
    import sentencepiece as spm

    folder = tokenizers["bos"]
    assert isinstance(load_tokenizer(folder), HFTokenizer)
    both = tmp_path / "both"
    both.mkdir()
    for file in folder.iterdir():
        (both / file.name).write_bytes(file.read_bytes())
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(LINES * 20),
        model_prefix=str(both / "tokenizer"),
        vocab_size=95,
        model_type="unigram",
        minloglevel=2,
        num_threads=1,
    )
    # A folder with tokenizer.model stays SentencePiece (as before); its tokenizer.json selects Hugging Face.
    assert isinstance(load_tokenizer(both), SentencePieceTokenizer)
    chosen = load_tokenizer(both / "tokenizer.json")
    assert isinstance(chosen, HFTokenizer) and chosen.path == both / "tokenizer.json"
    assert isinstance(load_tokenizer(chosen.path), HFTokenizer)  # what workers reload
    # The identity covers the config files too: another eos token is another tokenizer.
    config = json.loads((both / "tokenizer_config.json").read_text())
    (both / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<pad>"}))
    changed = load_tokenizer(both / "tokenizer.json")
    assert changed.sha256 != load_tokenizer(folder).sha256 and changed.eod_id == changed.pad_id


def test_both_kinds_are_the_tokenizer_protocol(tokenizers, tmp_path):
    """load_tokenizer gives a SentencePieceTokenizer or an HFTokenizer, each a Tokenizer with the same
    members; the SentencePiece module no longer hands out Hugging Face tokenizers itself."""
    import sentencepiece as spm

    from kumihimo.tokenizer import spm as spm_module

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(LINES * 20),
        model_prefix=str(tmp_path / "tokenizer"),
        vocab_size=95,
        model_type="unigram",
        minloglevel=2,
        num_threads=1,
    )
    loaded = {
        "sentencepiece": load_tokenizer(tmp_path / "tokenizer.model"),
        "huggingface": load_tokenizer(tokenizers["bos"]),
    }
    assert isinstance(loaded["sentencepiece"], SentencePieceTokenizer)
    assert isinstance(loaded["huggingface"], HFTokenizer)
    for kind, tokenizer in loaded.items():
        assert isinstance(tokenizer, Tokenizer) and tokenizer.kind == kind
        ids = tokenizer.encode("今日は晴れ")
        assert tokenizer.encode_batch(["今日は晴れ"]) == [ids] and "晴れ" in tokenizer.decode(ids)
        assert tokenizer.identity()["sha256"] == tokenizer.sha256 and tokenizer.vocab_size > 0
    assert not hasattr(spm_module.SentencePieceTokenizer, "load")
    with pytest.raises(UserError, match="applies to SentencePiece models only"):
        load_tokenizer(tokenizers["bos"], eod_piece="</s>")


def test_broken_tokenizer_folder_is_refused(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="transformers cannot load it"):
        load_tokenizer(folder)
    config = write_curated(tmp_path, {"ja": LINES}, 1)
    with pytest.raises(UserError, match="transformers cannot load it"):
        build_datasets(dataclasses.replace(config), folder)


@pytest.mark.slow  # a short training run
def test_trainer_takes_the_hf_tokenizer_folder(tokenizers, tmp_path):
    """`kumihimo train` on the datasets with data.tokenizer=<the folder>: vocabulary len(tokenizer)
    (padded for the model), EOD = the eos id, and the checkpoint records the tokenizer's identity."""
    from tests.test_convert_to_hf import _launch

    folder = tokenizers["bos"]
    config = write_curated(tmp_path, {"ja": LINES * 100}, 1)
    result = build_datasets(config, folder)
    run = tmp_path / "run"
    proc = _launch(
        [
            *("-m", "kumihimo.cli", "train", "configs/pretrain/tiny-cpu.yaml", "model.num_layers=1"),
            *("schedule.train_iters=2", "schedule.lr_warmup_iters=0", "schedule.eval_interval=0"),
            *("data.mock=false", f"data.blend_file={result.blend_path}", f"data.tokenizer={folder}"),
            f"output_dir={run}",
        ]
    )
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out[-3000:]
    meta = json.loads(next(run.rglob("iter_0000002/kumihimo.json")).read_text())
    tokenizer = HFTokenizer(folder)
    assert meta["tokenizer"] == tokenizer.identity()
    assert meta["vocab_size"] == len(tokenizer.hf) and meta["padded_vocab_size"] == 512
    assert tokenizer.eod_id == tokenizer.hf.convert_tokens_to_ids("</s>")


def test_train_config_accepts_the_folder_and_names_a_wrong_path(tokenizers, tmp_path):
    from kumihimo.pretrain.config import DataConfig
    from kumihimo.pretrain.preflight import check_data_paths

    check_data_paths(DataConfig(mock=False, blend=[], tokenizer=str(tokenizers["no_bos"])))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"data.tokenizer.*neither a SentencePiece model nor a Hugging Face"):
        check_data_paths(DataConfig(mock=False, blend=[], tokenizer=str(tmp_path / "empty")))
