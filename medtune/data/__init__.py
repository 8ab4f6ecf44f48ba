"""The data phase: records, tokenizers, chat templates, rows, packing and the tokenized cache."""
