"""triton.adapter.execute_token_batch: one engine call for a batch of requests, split back per request; the engines
read token tensors, embed_text tokenizes its texts through the same function (``read`` / ``outputs`` hooks)."""
import numpy as np

from ragstack.contracts import tensors as contracts
from ragstack.triton import adapter as ta
from ragstack.contracts.errors import InvalidInput, Unavailable
from tests.unit.fake_pb import FakePb, Request

PB = FakePb()


def _texts(*texts):
    return Request(text=contracts.bytes_array([[t] for t in texts]))


def _read_words(pb, request, contract):
    """A toy tokenizer: one id per word (its length), right-padded; the extra is each text's token count."""
    texts = ta.input_strings(pb, request, contract, "text")
    if any(not t for t in texts):
        raise InvalidInput("empty text")
    words = [t.split() for t in texts]
    length = max(len(w) for w in words)
    ids = np.array([[len(x) for x in w] + [0] * (length - len(w)) for w in words], np.int32)
    return ids, (ids > 0).astype(np.int32), [len(w) for w in words]


def _outputs(rows, counts):
    return {"embedding": rows, "num_tokens": np.array(counts, np.int32).reshape(-1, 1)}


def test_text_requests_are_tokenized_padded_and_run_as_one_call():
    calls = []

    def engine(ids, mask):
        calls.append(ids.shape)
        return np.stack([ids.sum(axis=1), mask.sum(axis=1)], axis=1).astype(np.float32)
    requests = [_texts("a bb"), _texts(""), _texts("ccc", "d ee fff")]
    out = ta.execute_token_batch(PB, requests, contracts.EMBED_TEXT, engine, "right", read=_read_words,
                                 outputs=_outputs)
    assert calls == [(3, 3)]                        # the two readable requests, padded to 3 tokens, in one call
    first = {t.name: t.arr for t in out[0].output_tensors}
    assert first["embedding"].tolist() == [[3.0, 2.0]] and first["num_tokens"].tolist() == [[2]]
    assert out[1].error.code == PB.TritonError.INVALID_ARG and "empty text" in out[1].error.msg
    third = {t.name: t.arr for t in out[2].output_tensors}
    assert third["embedding"].tolist() == [[3.0, 1.0], [6.0, 3.0]] and third["num_tokens"].tolist() == [[1], [3]]


def test_without_isolation_an_engine_failure_is_every_requests_error_after_one_call():
    calls = []

    def engine(ids, mask):
        calls.append(ids.shape)
        raise Unavailable("embed is loading")
    out = ta.execute_token_batch(PB, [_texts("a"), _texts("b c")], contracts.EMBED_TEXT, engine, "right",
                                 read=_read_words, outputs=_outputs, isolate=False)
    assert len(calls) == 1
    assert [r.error.code for r in out] == [PB.TritonError.UNAVAILABLE] * 2


def test_with_isolation_the_bad_request_is_found_and_the_others_answered():
    def engine(ids, mask):
        if (ids > 5).any():
            raise InvalidInput("id out of range")
        return ids.sum(axis=1).astype(np.float32)
    good, bad = np.array([[1, 2]], np.int32), np.array([[9]], np.int32)
    requests = [Request(input_ids=good, attention_mask=np.ones_like(good)),
                Request(input_ids=bad, attention_mask=np.ones_like(bad))]
    out = ta.execute_token_batch(PB, requests, contracts.RERANK, engine, "left", "score")
    assert out[0].output_tensors[0].arr.tolist() == [[3.0]]
    assert out[1].error.code == PB.TritonError.INVALID_ARG
