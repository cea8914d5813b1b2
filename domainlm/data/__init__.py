"""The data path: text files -> documents -> one token stream (cached on disk) -> training blocks.

Reading corpora (corpus), tokenizing and the token cache (tokens), blocks and their order (blocks),
`--packing docs` positions (packing) and the corpus lint (lint). Imports nothing above it.
"""
