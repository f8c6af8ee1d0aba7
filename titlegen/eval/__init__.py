"""Scoring descriptions: metrics, the one metric list and report writer, the rows and loaders taken from the
DataModule, the validate/test split metrics, and ``evaluate`` (untuned base versus fine-tuned)."""
