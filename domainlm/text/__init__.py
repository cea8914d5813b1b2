"""Text out of a model: generation (generate), seeded sampling settings (sampling), and the n-gram
index that flags samples copied from the training data (memorize).
"""
