"""Task data: the embedded synthetic task, hub preference datasets, their file schemas, tokenisation and benchmark
question/answer files.
"""
