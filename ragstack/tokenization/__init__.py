"""Tokenization: the lean fast tokenizer (fast_tokenizer.py) and chat templates (chat_template.py), the embed and
rerank engines' inputs (retrieval.py), and the generate engine's prompts and detokenization (generation.py). Plain
Python: nothing here imports Triton."""
