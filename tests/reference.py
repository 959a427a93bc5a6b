"""Independent, deliberately plain computations that the served and batched results are checked against:
one text at a time, no batching, no padding, straight from transformers."""
import torch

from ragstack.tokenization.retrieval import QWEN3_RERANK_PREFIX, QWEN3_RERANK_SUFFIX

TASK = "Given a web search query, retrieve relevant passages that answer the query"


def qwen3_embedding_ids(tokenizer, text, max_length):
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return tokenizer(text, add_special_tokens=False)["input_ids"][:max_length - 1] + [eos]


@torch.inference_mode()
def reference_embedding(model, ids, pooling, dim):
    """One text, no batch, no padding: the model's last hidden states, pooled, truncated, normalised."""
    hidden = model(input_ids=torch.tensor([ids])).last_hidden_state[0]
    vector = (hidden[-1] if pooling == "last_token" else hidden.mean(dim=0))[:dim]
    return (vector / vector.norm()).numpy()


def qwen3_rerank_ids(tokenizer, query, document, max_length, task=TASK):
    prefix, suffix = (tokenizer(part, add_special_tokens=False)["input_ids"]
                      for part in (QWEN3_RERANK_PREFIX, QWEN3_RERANK_SUFFIX))
    body = tokenizer(f"<Instruct>: {task}\n<Query>: {query}\n<Document>: {document}",
                     add_special_tokens=False)["input_ids"]
    return prefix + body[:max_length - len(prefix) - len(suffix)] + suffix


@torch.inference_mode()
def reference_yes_no(model, tokenizer, ids):
    logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
    yes, no = tokenizer.convert_tokens_to_ids(["yes", "no"])
    return torch.sigmoid(logits[yes] - logits[no]).item()
