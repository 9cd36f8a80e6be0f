"""The real server under generated requests: schemathesis reads the server's own OpenAPI document
(`/openapi.json`: our routes and KServe's) and sends valid and invalid requests to every operation;
none may be answered 5xx. Plus the answers chosen for KServe's extra routes on a one-model server
(serving/protocol/repository.py): a model version is a 404, repository load/unload a 403.

CI runs a bounded, derandomised set (OMNI_FUZZ_EXAMPLES per operation, default 12); `make fuzz`
runs more with a fresh seed. The figures (requests, statuses, 5xx) are printed at the end.
"""

from __future__ import annotations

import os
from collections import Counter

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from serving.local import start_server
from tests.summary import write_summary

EXAMPLES = int(os.environ.get("OMNI_FUZZ_EXAMPLES", "12"))
RANDOM = os.environ.get("OMNI_FUZZ_RANDOM") == "1"
TOKEN = "fuzz-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FIGURES: Counter = Counter()
# Small limits: a generated request either fails fast with a 4xx or costs a few greedy tokens.
SERVING = {"model_name": "omni", "max_new_tokens": 2,
           "limits": {"max_tokens": 4, "max_request_bytes": 256 * 1024, "max_batch_size": 2}}


@pytest.fixture(scope="module")
def base_url(checkpoint):
    server = start_server(checkpoint, checkpoint.parent, SERVING, env={"OMNI_API_TOKEN": TOKEN})
    yield server.base
    server.stop()


@pytest.fixture(scope="module")
def api(base_url):
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json", headers=AUTH)
    schema.config.update(base_url=base_url)
    return schema


@pytest.fixture(scope="module", autouse=True)
def fuzz_figures(request):
    FIGURES.clear()
    yield
    if FIGURES["requests"]:
        statuses = ", ".join(f"{k.removeprefix('status ')}: {n}" for k, n in sorted(FIGURES.items())
                             if k.startswith("status"))
        write_summary(request, f"schemathesis: {FIGURES['requests']} requests (statuses {statuses}), "
                               f"{FIGURES['5xx']} answered 5xx")


def _fuzz(operation, mode: GenerationMode, served: bool) -> str | None:
    """EXAMPLES generated requests of one kind to one operation (`served`: to the served model's name,
    so they reach the predictor rather than a 404); the first 5xx (shrunk), if any."""
    fixed = {"model_name": SERVING["model_name"]} if served else None

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=not RANDOM, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode, path_parameters=fixed))
    def send(case) -> None:
        response = case.call(headers=AUTH, timeout=120)
        FIGURES["requests"] += 1
        FIGURES[f"status {response.status_code}"] += 1
        FIGURES["5xx"] += response.status_code >= 500
        assert response.status_code < 500, f"{response.status_code}: {response.text[:300]}\n{case.as_curl_command()}"

    try:
        send()
    except Unsatisfiable:  # nothing to make invalid (no parameters, no body): no negative cases exist
        return None
    except AssertionError as err:
        return f"{operation.method.upper()} {operation.path} ({mode.value}, served={served}): {err}"
    return None


def test_no_generated_request_gets_a_5xx(api):
    """Valid (positive) and invalid (negative) requests for every operation of the document. (One
    test over all operations: schemathesis' own pytest plug-in does not run under pytest 9.)"""
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 15, [op.path for op in operations]
    runs = [(op, mode, served) for op in operations for mode in GenerationMode
            for served in ([False, True] if "{model_name}" in op.path else [False])]
    failures = [f for op, mode, served in runs if (f := _fuzz(op, mode, served))]
    assert not failures, "\n\n".join(failures)
    assert FIGURES["5xx"] == 0 and FIGURES["requests"] >= len(operations)


@pytest.mark.parametrize("method, path", [
    ("GET", "/v2/models/omni/versions/1"), ("GET", "/v2/models/omni/versions/1/ready"),
    ("POST", "/v2/models/omni/versions/1/infer"), ("GET", "/v2/models/other/versions/7/ready"),
    ("GET", "/v2/models/omni?model_version=1"), ("GET", "/v2/models/omni/ready?model_version=1"),
    ("POST", "/v2/models/omni/infer?model_version=1"),
])
def test_a_model_version_is_a_404(base_url, method, path):
    body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hi"]}]}
    r = requests.request(method, base_url + path, json=body if method == "POST" else None, headers=AUTH, timeout=30)
    assert r.status_code == 404, r.text  # KServe's own answer: 501 "Model versioning not supported yet"
    assert "without versions; use /v2/models/omni" in r.json()["error"]


def test_repository_load_and_unload_are_refused_and_the_model_keeps_serving(base_url):
    for action in ("unload", "load"):
        for model in ("omni", "unknown"):  # KServe: unload succeeds (200), loading an unknown model is a 503
            r = requests.post(f"{base_url}/v2/repository/models/{model}/{action}", headers=AUTH, timeout=30)
            assert r.status_code == 403, r.text
            assert "model repository control is disabled" in r.json()["error"]
    assert requests.post(f"{base_url}/v2/repository/models/omni/unload", timeout=30).status_code == 401  # no token
    assert requests.get(f"{base_url}/v2/models/omni/ready", headers=AUTH, timeout=30).status_code == 200
    r = requests.post(f"{base_url}/v2/models/omni/infer", headers=AUTH, timeout=120,
                      json={"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hi"]}]})
    assert r.status_code == 200, r.text


def test_the_openapi_document_needs_the_token(base_url):
    assert requests.get(f"{base_url}/openapi.json", timeout=30).status_code == 401
    doc = requests.get(f"{base_url}/openapi.json", headers=AUTH, timeout=30).json()
    assert "/openai/v1/chat/completions" in doc["paths"] and "/v2/models/{model_name}/infer" in doc["paths"]
