"""Text data: the offline English corpus, tokenizers, packed streaming datasets and SFT pairs."""
