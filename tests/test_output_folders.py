"""Issue 23: the project deletes only what it created, an output folder belongs wholly to one export
(replaced atomically) or is refused, and each input file is read once.

Cases: `tokenizer train overwrite=true` deleted a whole output_dir with the user's files in it;
`tokenizer export-hf` into a non-empty folder kept a stale added_tokens.json (2050 tokens instead of
2048, other ids); a symbolic link loop (`sub/up -> ..`) made curate read every file 41 times.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kumihimo.core.errors import UserError
from kumihimo.core.files import OWNER_FILE, matching_files, owned_output_folder
from kumihimo.tokenizer.export_hf import export_hf
from kumihimo.tokenizer.train import train_tokenizer
from tests.test_tokenizer_train import make_config, recipe


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> Path:
    from tests.test_convert_to_hf import train_spm

    return train_spm(tmp_path_factory.mktemp("tok") / "tok", seed=5)


# ---- the shared rule -------------------------------------------------------------------------------


def test_owned_folder_is_replaced_whole_and_anything_else_refused(tmp_path):
    out = tmp_path / "out"
    with owned_output_folder(out, "--output", "export a") as staging:
        (staging / "a.txt").write_text("1")
        (staging / "stale.txt").write_text("old")
    assert sorted(os.listdir(out)) == [OWNER_FILE, "a.txt", "stale.txt"]
    with owned_output_folder(out, "--output", "export a") as staging:
        (staging / "a.txt").write_text("2")
    assert sorted(os.listdir(out)) == [OWNER_FILE, "a.txt"]  # no stale file survives a re-export
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or old copy left

    with pytest.raises(UserError, match=r"--output=.* holds the output of `export a`, not of `export b`"):
        with owned_output_folder(out, "--output", "export b"):
            pass
    with pytest.raises(UserError, match="already exists and is not empty; choose another folder$"):
        with owned_output_folder(out, "--output", "export a", replace=False):
            pass
    (out / "mine.txt").write_text("user")
    (out / OWNER_FILE).unlink()
    with pytest.raises(UserError, match=r"holds files kumihimo did not write there \(mine.txt\)"):
        with owned_output_folder(out, "--output", "export a", own_names=("a.txt",)):
            pass
    assert (out / "mine.txt").read_text() == "user"

    failing = tmp_path / "failing"
    failing.mkdir()
    with pytest.raises(RuntimeError):
        with owned_output_folder(failing, "--output", "export a") as staging:
            (staging / "half").write_text("x")
            raise RuntimeError("the export failed")
    assert os.listdir(failing) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["failing", "out"]


def test_an_output_folder_holding_an_input_is_refused(tmp_path):
    (tmp_path / "in.model").write_text("x")
    with pytest.raises(UserError, match=r"holds an input of this command"):
        with owned_output_folder(tmp_path, "--output", "export a", inputs=[tmp_path / "in.model"]):
            pass


# ---- tokenizer train (issue 23.1) ------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from kumihimo.tokenizer import synthetic

    root = tmp_path_factory.mktemp("corpus")
    for lang in ("ja", "en", "code"):
        synthetic.write_jsonl(root / f"{lang}.jsonl", lang, 300)
    return root


def test_tokenizer_train_overwrite_never_deletes_user_files(corpus, tmp_path):
    output_dir = tmp_path / "tok"
    (output_dir / "notes").mkdir(parents=True)
    (output_dir / "notes" / "plan.md").write_text("mine")
    (output_dir / "tokenizer.model").write_text("old")
    data = recipe(corpus, output_dir, overwrite=True, vocab_size=1000)
    with pytest.raises(UserError, match=r"output_dir=.*holds files kumihimo did not write there \(notes"):
        train_tokenizer(make_config(data))  # refused before sampling
    assert (output_dir / "notes" / "plan.md").read_text() == "mine"

    (output_dir / "notes" / "plan.md").unlink()
    (output_dir / "notes").rmdir()  # now only a tokenizer's files (from before OWNER_FILE): replaced
    model = train_tokenizer(make_config(data))
    assert model.stat().st_size > 1000 and (output_dir / OWNER_FILE).is_file()
    (output_dir / "extra.txt").write_text("mine")  # a user file in a marked folder: refused too
    with pytest.raises(UserError, match=r"output_dir=.*extra.txt"):
        train_tokenizer(make_config(data))
    assert (output_dir / "extra.txt").read_text() == "mine"


# ---- tokenizer export-hf (issue 23.3) --------------------------------------------------------------


def test_export_hf_into_a_folder_with_stale_files_is_refused(spm_model, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "added_tokens.json").write_text(json.dumps({"<extra_0>": 1000, "<extra_1>": 1001}))
    with pytest.raises(
        UserError, match=r"--output=.*holds files kumihimo did not write there \(added_tokens"
    ):
        export_hf(spm_model, out)
    (out / "added_tokens.json").unlink()

    export_hf(spm_model, out)
    (out / "added_tokens.json").write_text(json.dumps({"<extra_0>": 1000}))
    with pytest.raises(UserError, match="added_tokens.json"):
        export_hf(spm_model, out)  # a file added after the export is not the export's: refused
    (out / "added_tokens.json").unlink()
    export_hf(spm_model, out)  # its own earlier export: replaced whole
    transformers = pytest.importorskip("transformers")
    assert len(transformers.AutoTokenizer.from_pretrained(out)) == 1000


def test_export_hf_to_a_folder_that_cannot_be_written_is_one_line(spm_model, tmp_path):
    with pytest.raises(UserError, match=r"--output='/proc/.*' cannot be written"):
        export_hf(spm_model, "/proc/kumihimo-export")
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(UserError, match=r"--output=.* is a file"):
        export_hf(spm_model, tmp_path / "a-file")


# ---- symbolic link loops (issue 23.4) --------------------------------------------------------------


def test_a_symlink_loop_reads_each_file_once(tmp_path, capsys, monkeypatch):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    for name in ("a.jsonl", "sub/b.jsonl", "sub/deeper/c.jsonl"):
        (tmp_path / name).write_text("{}\n")
    (tmp_path / "sub" / "up").symlink_to("..")
    (tmp_path / "sub" / "deeper" / "up2").symlink_to("../..")  # two loops: glob's walk is exponential
    (tmp_path / "sub" / "alias.jsonl").symlink_to("../a.jsonl")
    expected = [str(tmp_path / n) for n in ("a.jsonl", "sub/b.jsonl", "sub/deeper/c.jsonl")]
    assert matching_files(str(tmp_path / "**" / "*.jsonl"), "input.sources[ja].paths") == expected
    err = capsys.readouterr().err
    assert "input.sources[ja].paths" in err and "each file is read once" in err
    monkeypatch.chdir(tmp_path)
    assert matching_files("**/*.jsonl", "k") == ["a.jsonl", "sub/b.jsonl", "sub/deeper/c.jsonl"]
    below = matching_files(str(tmp_path / "sub" / "**"), "k")  # sub/up leads to a.jsonl too
    assert sorted(os.path.realpath(p) for p in below) == sorted(os.path.realpath(p) for p in expected)


def test_curate_plans_each_file_of_a_looped_tree_once(tmp_path):
    from kumihimo.data_prep.config import DataPrepConfig, SourceConfig
    from kumihimo.data_prep.shards import plan_shards

    (tmp_path / "data" / "sub").mkdir(parents=True)
    for name in ("x.jsonl", "sub/y.jsonl"):
        (tmp_path / "data" / name).write_text(json.dumps({"text": "本文です。"}) + "\n")
    (tmp_path / "data" / "sub" / "up").symlink_to("..")
    config = DataPrepConfig(output_dir=str(tmp_path / "out"))
    config.input.sources = [SourceConfig(name="ja", paths=[str(tmp_path / "data" / "**" / "*.jsonl")])]
    assert sorted(Path(s.path).name for s in plan_shards(config)) == ["x.jsonl", "y.jsonl"]
