"""kiln's benchmark harness: kilnd and kiln against their peers, interleaved A/B rounds."""
