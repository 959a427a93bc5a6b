"""ragstack.contracts.client and Contract.input_arrays: client requests built from the tensor contracts, outputs read back."""
import json
import types

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from ragstack.contracts import client as client_io
from ragstack.contracts import tensors as contracts


def _input(inputs, name):
    (found,) = [i for i in inputs if i.name() == name]
    return found


def test_bytes_arrays_encode_text_keep_bytes_and_keep_the_shape():
    arr = contracts.bytes_array(["é", b"\xff raw"])
    assert arr.dtype == np.object_ and arr.tolist() == ["é".encode("utf-8"), b"\xff raw"]
    assert contracts.bytes_array(np.array([["a"], ["b"]], dtype=object)).tolist() == [[b"a"], [b"b"]]
    assert contracts.one_string("search").tolist() == [b"search"]


def test_plain_values_are_one_request_with_the_batch_dimension_where_the_model_batches():
    arrays = contracts.RAG.input_arrays({"query": "q", "top_k": 4, "documents": ["a", "b"], "schema": None})
    assert set(arrays) == {"query", "top_k", "documents"}          # None: the optional input is left out
    assert arrays["query"].tolist() == [[b"q"]]
    assert arrays["top_k"].dtype == np.int32 and arrays["top_k"].shape == (1, 1)
    assert arrays["documents"].shape == (1, 2)
    # vector_index does not batch: no batch dimension; the vector is cast to the contract's FP32
    index = contracts.VECTOR_INDEX.input_arrays({"op": "search", "query_vector": [0.5, 1], "top_k": 3})
    assert index["op"].shape == (1,) and index["query_vector"].dtype == np.float32 and index["top_k"].tolist() == [3]


def test_an_array_keeps_its_shape_and_is_cast_to_the_contracts_dtype():
    arrays = contracts.EMBED_TEXT.input_arrays({"text": np.array([["a"], ["b"]], dtype=object)})
    assert arrays["text"].tolist() == [[b"a"], [b"b"]]
    ids = contracts.EMBED.input_arrays({"input_ids": np.ones((2, 3), np.int64)})["input_ids"]
    assert ids.dtype == np.int32 and ids.shape == (2, 3)


def test_a_name_outside_the_contract_is_refused():
    with pytest.raises(KeyError, match="rag has no input named 'querry'"):
        contracts.RAG.input_arrays({"querry": "q"})


@pytest.mark.parametrize("mod", [httpclient, grpcclient])
def test_infer_inputs_take_the_datatype_from_the_contract(mod):
    inputs = client_io.infer_inputs(mod, "rag", {"query": "q", "top_k": np.array([[8]], np.int64), "max_tokens": None})
    assert sorted(i.name() for i in inputs) == ["query", "top_k"]
    assert _input(inputs, "top_k").datatype() == "INT32" and _input(inputs, "query").datatype() == "BYTES"
    assert _input(inputs, "query").shape() == [1, 1]


def test_inputs_as_given_keep_a_wrong_dtype_and_so_does_a_model_without_a_contract():
    (top_k,) = client_io.inputs_as_given("http", {"top_k": np.array([[8]], np.int64)})
    assert top_k.datatype() == "INT64"
    (x,) = client_io.infer_inputs("grpc", "no_such_model", {"x": np.zeros((1, 2), np.float32), "y": None})
    assert (x.name(), x.datatype(), x.shape()) == ("x", "FP32", [1, 2])
    with pytest.raises(ValueError, match="http or grpc"):
        client_io.infer_inputs("tcp", "rag", {"query": "q"})


class _Result:
    def __init__(self, arrays, response):
        self.arrays, self.response = arrays, response

    def as_numpy(self, name):
        return self.arrays.get(name)

    def get_response(self):
        return self.response


def test_outputs_are_read_by_name_from_http_and_grpc_results():
    arrays = {"report": np.array([json.dumps({"n": 1}).encode()], dtype=object), "answer": np.array([[b"hi"]], object)}
    http = _Result(arrays, {"outputs": [{"name": "report"}, {"name": "answer"}]})
    grpc = _Result(arrays, types.SimpleNamespace(outputs=[types.SimpleNamespace(name="answer")]))
    assert set(client_io.outputs(http)) == {"report", "answer"}
    assert set(client_io.outputs(grpc)) == {"answer"}
    assert set(client_io.outputs(http, ["answer", "absent"])) == {"answer"}
    assert client_io.output_json(http, "report") == {"n": 1}
    assert client_io.output_string(grpc, "answer") == "hi" and client_io.output_string(grpc, "absent") is None
