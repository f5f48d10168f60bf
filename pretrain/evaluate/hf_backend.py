"""Score tasks with a Hugging Face causal LM folder (e.g. the output of `kumihimo convert to-hf`)."""

from __future__ import annotations

from pathlib import Path

import torch

from kumihimo.core.errors import UserError
from kumihimo.pretrain.evaluate.scoring import Row, select_scores


class HFCodec:
    """The folder's own tokenizer, called as lm-evaluation-harness calls it (encode with its defaults)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_token_id
        self.prefix_id = (
            tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        )

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def encode_plain(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class HFBackend:
    def __init__(self, folder: str | Path, device: str = "cpu", dtype: str = "float32"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise UserError(f"{folder} has no config.json: not a Hugging Face model folder; pass one")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError) as exc:
            raise UserError(f"{folder} has no usable tokenizer ({exc}); export one into the folder") from exc
        self.model = (
            AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).to(device).eval()
        )
        self.device = torch.device(device)
        self.codec = HFCodec(self.tokenizer)
        self.vocab_size = self.model.config.vocab_size
        self.max_length = int(getattr(self.model.config, "max_position_embeddings", 2048))

    @torch.no_grad()
    def score_rows(self, rows: list[Row]) -> list[tuple[list[float], list[int]]]:
        width = max(len(r.tokens) for r in rows)
        pad = self.codec.prefix_id or 0
        batch = torch.tensor([r.tokens + [pad] * (width - len(r.tokens)) for r in rows], device=self.device)
        logits = self.model(batch).logits  # right padding: causal attention never sees it
        return select_scores(logits, rows, self.vocab_size)
