"""attnpipe: reproducible, distributed training of attention CNNs (see README.md)."""
