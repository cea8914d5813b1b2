"""Exact evaluation: a token stream cut into scoring windows and their NLL sum (windows), and the
`perplexity` command over a file or folder (perplexity). Shared by training and `domainlm perplexity`.
"""
