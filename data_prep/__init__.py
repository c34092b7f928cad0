"""Data-preparation helpers for fairseq-smoe (corpus download, cleaning, fixtures)."""
