"""The data stage: a corpus -> a dataset dir (tokenizer + packed Parquet shards + manifest), and
chat records -> ids + loss mask for fine-tuning. See docs/data.md."""
