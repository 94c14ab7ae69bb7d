"""The dual-stream retrieval model at inference: encoding, DeepFashion2 protocols, baselines, extraction."""
