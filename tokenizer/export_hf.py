"""Export a SentencePiece model as a Hugging Face fast tokenizer that gives the same ids.

The `tokenizers` pipeline is assembled to reproduce SentencePiece exactly:
- user-defined pieces are added tokens, split out before the model sees the text, as
  SentencePiece's prefix matcher does;
- control pieces (<s>, </s>, <pad>, ...) and <unk> are never produced from text by SentencePiece,
  so a literal "<s>" in a document must stay characters: they are special added tokens with
  `split_special_tokens` on, and the Unigram model scores them (and byte pieces) out of reach;
- spaces become "▁" (Metaspace, no splitting), a dummy prefix only at the start when the model has one;
- byte fallback and the model's scores (Unigram) or merges (BPE) come from the .model file.
HF `encode` adds <s> (a prompt then looks like the start of a training document), never </s>.

Known limits (none apply to tokenizers trained by kumihimo): SentencePiece adds scores in float32,
so exact ties between splits (5+1 vs 1+5 spaces) may be broken differently than by HF's float64
(kumihimo rounds its scores so sums stay exact; see train.SCORE_QUANTUM); with a dummy prefix and
user-defined pieces, text that starts with a space or with such a piece misses the prefix in HF;
with whitespace removal, HF strips around user-defined pieces.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from sentencepiece import sentencepiece_model_pb2 as sp_model
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from kumihimo.core.errors import UserError
from kumihimo.core.files import owned_output_folder
from kumihimo.tokenizer.spm import MODEL_FILENAME, resolve_model_path

SPACE_SYMBOL = "▁"
Piece = sp_model.ModelProto.SentencePiece
SPECIAL_TYPES = (Piece.CONTROL, Piece.UNKNOWN, Piece.UNUSED)
UNMATCHED_TYPES = (*SPECIAL_TYPES, Piece.BYTE)
OWN_NAMES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", MODEL_FILENAME)
"""What an export writes (a folder holding only these, from before OWNER_FILE, is an export's)."""
UNK_PENALTY = 10.0  # SentencePiece and HF both score an unknown character min_score - 10


def read_model_proto(model_path: str | Path) -> sp_model.ModelProto:
    path = resolve_model_path(model_path)
    proto = sp_model.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as exc:  # protobuf raises its own DecodeError type
        raise UserError(f"{path} is not a SentencePiece model ({exc}); pass a .model file") from exc
    if not proto.pieces:
        raise UserError(f"{path} holds no pieces; pass a trained SentencePiece .model file")
    return proto


def _unigram_vocab(proto: sp_model.ModelProto) -> list[tuple[str, float]]:
    """(piece, score) for HF Unigram. SentencePiece never matches control, unknown, unused or byte
    pieces against text, but HF's Viterbi matches every vocabulary string (a literal "<s>" or
    "<0x41>" would become one token). So those pieces get a score below any path of single
    characters that spells them, which keeps HF from choosing them while their ids stay put."""
    normal_scores = [p.score for p in proto.pieces if p.type == Piece.NORMAL]
    floor = min(normal_scores, default=0.0)
    longest = max((len(p.piece) for p in proto.pieces if p.type in UNMATCHED_TYPES), default=1)
    unmatched_score = min(floor, -1.0) * (longest + 1) - UNK_PENALTY
    return [(p.piece, unmatched_score if p.type in UNMATCHED_TYPES else p.score) for p in proto.pieces]


def _unknown_chars_in_unmatched(proto: sp_model.ModelProto) -> list[str]:
    """Characters of control/byte piece names (e.g. "<" of "<s>") that no normal piece contains.
    SentencePiece treats them as unknown, a token boundary on both sides; HF would rather match the
    whole name than pay the unknown penalty, so the HF pipeline splits them off first."""
    covered: set[str] = set()
    for piece in proto.pieces:
        if piece.type in (Piece.NORMAL, Piece.USER_DEFINED):
            covered.update(piece.piece)
    names = "".join(p.piece for p in proto.pieces if p.type in UNMATCHED_TYPES)
    return sorted(set(names) - covered)


def _bpe_merges(proto: sp_model.ModelProto) -> list[tuple[str, str]]:
    """Merges for HF BPE: every split of a piece into two pieces, in the order SentencePiece merges
    (higher score first, i.e. lower id among learned pieces)."""
    vocab = {p.piece: i for i, p in enumerate(proto.pieces) if p.type in (Piece.NORMAL, Piece.USER_DEFINED)}
    ranked: list[tuple[float, int, int, tuple[str, str]]] = []
    for piece, piece_id in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                score = proto.pieces[piece_id].score
                ranked.append((-score, piece_id, vocab[left], (left, right)))
    ranked.sort()
    return [merge for *_, merge in ranked]


def build_model(proto: sp_model.ModelProto) -> models.Model:
    model_type = proto.trainer_spec.model_type
    byte_fallback = proto.trainer_spec.byte_fallback
    unk_id = next((i for i, p in enumerate(proto.pieces) if p.type == Piece.UNKNOWN), None)
    if model_type == sp_model.TrainerSpec.UNIGRAM:
        return models.Unigram(_unigram_vocab(proto), unk_id=unk_id, byte_fallback=byte_fallback)
    if model_type == sp_model.TrainerSpec.BPE:
        vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
        unk = proto.pieces[unk_id].piece if unk_id is not None else None
        return models.BPE(
            vocab, _bpe_merges(proto), unk_token=unk, fuse_unk=True, byte_fallback=byte_fallback
        )
    kind = sp_model.TrainerSpec.ModelType.Name(model_type)
    raise UserError(f"SentencePiece model type {kind} cannot be exported; only UNIGRAM and BPE models can")


def _prefix_in_normalizer(proto: sp_model.ModelProto) -> bool:
    """Where the dummy prefix goes. HF normalizes each stretch of text between added tokens on its
    own, so with user-defined pieces (e.g. "\\n") a normalizer would prefix every line; Metaspace's
    "first" prefixes only the first stretch, but skips text that already starts with a space (or
    whose first character was stripped). Each choice is exact where the other is not."""
    spec = proto.normalizer_spec
    has_user_defined = any(p.type == Piece.USER_DEFINED for p in proto.pieces)
    return spec.add_dummy_prefix and (spec.remove_extra_whitespaces or not has_user_defined)


def build_normalizer(proto: sp_model.ModelProto) -> normalizers.Normalizer | None:
    spec = proto.normalizer_spec
    steps: list[normalizers.Normalizer] = []
    if spec.precompiled_charsmap:  # empty for identity normalization
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if _prefix_in_normalizer(proto):
        steps.append(normalizers.Prepend(" "))
    return normalizers.Sequence(steps) if steps else None


def build_tokenizer(proto: sp_model.ModelProto) -> HFTokenizer:
    """The `tokenizers` pipeline equivalent to the SentencePiece model."""
    tokenizer = HFTokenizer(build_model(proto))
    normalizer = build_normalizer(proto)
    if normalizer is not None:
        tokenizer.normalizer = normalizer
    dummy_prefix = proto.normalizer_spec.add_dummy_prefix
    prepend = dummy_prefix and not _prefix_in_normalizer(proto)
    metaspace = pre_tokenizers.Metaspace(
        replacement=SPACE_SYMBOL, prepend_scheme="first" if prepend else "never", split=False
    )
    unknown = _unknown_chars_in_unmatched(proto)
    if unknown:
        pattern = "[" + "".join(f"\\x{{{ord(c):X}}}" for c in unknown) + "]"
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(pattern), behavior="isolated"), metaspace]
        )
    else:
        tokenizer.pre_tokenizer = metaspace
    steps = [decoders.Replace(SPACE_SYMBOL, " "), decoders.ByteFallback(), decoders.Fuse()]
    if dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)
    added = []
    for piece in proto.pieces:
        if piece.type in SPECIAL_TYPES:
            added.append(AddedToken(piece.piece, special=True, normalized=False))
        elif piece.type == Piece.USER_DEFINED:
            added.append(AddedToken(piece.piece, special=False, normalized=False))
    # The strings are in the model's vocabulary, so the added tokens keep SentencePiece's ids.
    tokenizer.add_special_tokens([t for t in added if t.special])
    tokenizer.add_tokens([t for t in added if not t.special])
    bos = _piece_of_id(proto, proto.trainer_spec.bos_id)
    if bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, proto.trainer_spec.bos_id)]
        )
    return tokenizer


def _piece_of_id(proto: sp_model.ModelProto, token_id: int) -> str | None:
    return proto.pieces[token_id].piece if 0 <= token_id < len(proto.pieces) else None


def tokenizer_config(proto: sp_model.ModelProto) -> tuple[dict[str, Any], dict[str, str]]:
    """tokenizer_config.json and special_tokens_map.json contents."""
    spec = proto.trainer_spec
    special = {
        name: _piece_of_id(proto, token_id)
        for name, token_id in (
            ("unk_token", spec.unk_id),
            ("bos_token", spec.bos_id),
            ("eos_token", spec.eos_id),
            ("pad_token", spec.pad_id),
        )
    }
    special = {name: piece for name, piece in special.items() if piece is not None}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": "bos_token" in special,
        "add_eos_token": False,
        # A literal "<s>" in text is characters for SentencePiece; keep it so in HF.
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000,
    }
    return config, special


def check_ids(proto: sp_model.ModelProto, tokenizer: HFTokenizer) -> None:
    """Every id must map to the same piece as in SentencePiece (added tokens kept their ids)."""
    for token_id, piece in enumerate(proto.pieces):
        actual = tokenizer.id_to_token(token_id)
        assert actual == piece.piece, f"id {token_id}: {actual!r} != {piece.piece!r}"


def export_hf(model_path: str | Path, output_dir: str | Path) -> Path:
    """Write a Hugging Face tokenizer directory for `model_path`; returns `output_dir`."""
    model_file = resolve_model_path(model_path)
    proto = read_model_proto(model_file)
    tokenizer = build_tokenizer(proto)
    check_ids(proto, tokenizer)
    config, special = tokenizer_config(proto)
    output_dir = Path(output_dir)
    # The whole folder is this export's: stale files beside it (an old added_tokens.json) change ids.
    with owned_output_folder(
        output_dir, "--output", "tokenizer export-hf", own_names=OWN_NAMES, inputs=[model_file]
    ) as staging:
        _write_files(model_file, tokenizer, config, special, staging)
    return output_dir


def write_hf_tokenizer_files(model_path: str | Path, folder: Path) -> None:
    """The files of `export_hf` written into `folder`, a folder its caller owns and publishes (the
    model folder `convert to-hf` stages), beside what is already there."""
    model_file = resolve_model_path(model_path)
    proto = read_model_proto(model_file)
    tokenizer = build_tokenizer(proto)
    check_ids(proto, tokenizer)
    config, special = tokenizer_config(proto)
    _write_files(model_file, tokenizer, config, special, folder)


def _write_files(model_file: Path, tokenizer: HFTokenizer, config: dict, special: dict, folder: Path) -> None:
    tokenizer.save(str(folder / "tokenizer.json"))
    for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        (folder / name).write_text(json.dumps(content, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    shutil.copyfile(model_file, folder / MODEL_FILENAME)
