"""From a raw file to batches: records and cleaning (torch-free), the split cache, prompts, encoding, collates,
batch samplers, the predict CSV, and the LightningDataModule that ties them to Lightning's hooks."""
