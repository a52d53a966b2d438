"""Peer engines kvstrata is measured against: llama.cpp (llama-server, llama-bench) and transformers.

Nothing here is committed binary: `make bench-peers` (``python -m benchmarks.peers.prepare``) builds
the peers into a cache directory outside the repository, and the benchmark modules find them there.
"""
