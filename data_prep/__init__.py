"""Converters from the public Chinese medical corpora to medtune's instruction-record format."""
