"""Bytes in and out, below every stage: object stores and local paths (`storage`), listing
a bucket in ranges (`listing`) and choosing what to read (`selection`), retried and
sniffed reads (`reads`), the one image decode path (`preprocess`), thread sizing
(`threads`) and what a person sees on the terminal (`console`). Imports no other stage."""
