"""Test-only helpers: streamed-vs-offline measurement, an exhaustive reach probe, A/V test decoders and
readers of what the live writer put in each segment. Not shipped with the pack."""
