"""data_prep: raw JSONL -> curated, deduplicated, PII-redacted text -> Megatron datasets + blend."""
