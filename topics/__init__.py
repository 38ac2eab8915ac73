"""The wire contract: topic names, event models, the codec and a small client."""
