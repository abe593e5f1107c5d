"""What a converted model runs: per-signature programs behind the stream owners' ``forward``."""
