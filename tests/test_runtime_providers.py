"""Execution-provider resolution and fallback (the installed onnxruntime here has CPU only)."""
import onnxruntime as ort
import pytest

from edgeinfer.errors import ConfigError, ProviderError
from edgeinfer.runtime.providers import CPU, SessionSettings, create_session, resolve_provider

from runtime_models import build_tiny_onnx, tiny_spec


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory):
    return build_tiny_onnx(tiny_spec(layers=1), tmp_path_factory.mktemp("prov"))


def test_aliases():
    assert resolve_provider("qnn") == "QNNExecutionProvider"
    assert resolve_provider("NNAPI") == "NnapiExecutionProvider"
    assert resolve_provider("coreml") == "CoreMLExecutionProvider"
    assert resolve_provider("xnnpack") == "XnnpackExecutionProvider"
    assert resolve_provider("dml") == "DmlExecutionProvider"
    assert resolve_provider("cuda") == "CUDAExecutionProvider"
    assert resolve_provider("cpu") == CPU
    assert resolve_provider("FooExecutionProvider") == "FooExecutionProvider"
    with pytest.raises(ConfigError, match="unknown execution provider 'tpu'"):
        resolve_provider("tpu")


def test_missing_providers_fall_back_to_cpu_and_say_why(onnx_path):
    missing = [p for p in ("qnn", "coreml", "nnapi") if resolve_provider(p) not in ort.get_available_providers()]
    assert missing, "this test needs providers that are not installed"
    sess, report = create_session(onnx_path, missing, model="target")
    assert report.chosen == CPU and sess.get_providers()[0] == CPU
    assert [s.provider for s in report.skipped] == [resolve_provider(p) for p in missing]
    assert all("not installed in this onnxruntime" in s.reason for s in report.skipped)
    assert report.requested[-1] == CPU  # appended as the last resort
    text = report.describe()
    assert text.startswith("target: CPUExecutionProvider (skipped ")
    assert all(resolve_provider(p) in text for p in missing)


def test_order_is_respected_and_cpu_first_means_no_skips(onnx_path):
    _, report = create_session(onnx_path, ["cpu", "cuda"])
    assert report.chosen == CPU and report.skipped == ()


def test_session_creation_failure_is_reported(tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not an onnx model")
    with pytest.raises(ProviderError) as e:
        create_session(bad, ["qnn", "cpu"], model="draft")
    msg = str(e.value)
    assert "broken.onnx" in msg and "draft" in msg
    assert "QNNExecutionProvider: not installed" in msg
    assert "CPUExecutionProvider: session creation failed" in msg


def test_no_cpu_fallback_when_disabled(onnx_path):
    with pytest.raises(ProviderError, match="not installed"):
        create_session(onnx_path, ["qnn"], cpu_fallback=False)


def test_session_settings(onnx_path):
    so = SessionSettings(intra_op_threads=1, inter_op_threads=1, graph_optimization="basic").session_options()
    assert so.intra_op_num_threads == 1 and so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    with pytest.raises(ConfigError, match="graph_optimization"):
        SessionSettings(graph_optimization="O3")
    with pytest.raises(ConfigError, match="intra_op_threads"):
        SessionSettings(intra_op_threads=-2)
    sess, _ = create_session(onnx_path, ["cpu"], SessionSettings(intra_op_threads=1))
    assert sess.get_providers() == [CPU]
