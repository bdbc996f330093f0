"""The Triton model repository: every config.pbtxt parsed with Triton's own protobuf definitions and checked field by
field, the ensemble wired as Triton validates it, the metadata Triton would report equal to our server's, and the
repository's Python steps answering what our server answers, on the bundled MiniLM (its ONNX export is cached)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from modelpress.serving.config import BatchConfig

BATCHING = BatchConfig(max_batch_size=16, max_queue_delay_ms=2.5, max_queue_size=256, timeout_s=12.0, instances=2)
# the repository's Python steps run the same ONNX file with the same ONNX Runtime as our server; only the pooling
# arithmetic's order may differ (float32 sums over <= 128 tokens)
EMBEDDING_ATOL = 1e-5
TEXTS = ["A man is playing a guitar.", "Triton and modelpress answer alike.", "short"]


def _triton_pb2() -> Any:
    """``tritonclient.grpc.model_config_pb2``, loaded from its file: the ``tritonclient.grpc`` package itself imports grpcio,
    which the ``http`` extra installed here does not bring (and ray[serve] and tritonclient[grpc] disagree on protobuf)."""
    name = "_triton_model_config_pb2"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or spec.origin is None:
        pytest.skip("tritonclient is not installed (pip install 'modelpress[test]')")
    path = Path(spec.origin).parent / "grpc" / "model_config_pb2.py"
    module_spec = importlib.util.spec_from_file_location(name, path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    sys.modules[name] = module
    return module


def parse(folder: Path) -> Any:
    from google.protobuf import text_format

    pb2 = _triton_pb2()
    return text_format.Parse((folder / "config.pbtxt").read_text(), pb2.ModelConfig())


def triton_metadata(config: Any, repo: Path) -> dict[str, Any]:
    """What Triton answers to ``GET /v2/models/NAME`` for ``config`` (core/src/tritonserver.cc,
    TRITONSERVER_ServerModelMetadata): the ready versions, the platform (else the backend), and each
    tensor's protocol datatype (TYPE_STRING -> BYTES) with -1 before the dims when max_batch_size >= 1."""
    pb2 = _triton_pb2()

    def tensor(t: Any) -> dict[str, Any]:
        kind = pb2.DataType.Name(t.data_type).removeprefix("TYPE_")
        return {
            "name": t.name,
            "datatype": "BYTES" if kind == "STRING" else kind,
            "shape": [-1] * (config.max_batch_size >= 1) + list(t.dims),
        }

    folder = repo / config.name
    on_disk = sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())
    wanted = set(config.version_policy.specific.versions) if config.version_policy.HasField("specific") else set(on_disk)
    return {
        "name": config.name,
        "versions": [str(v) for v in on_disk if v in wanted],
        "platform": config.platform or config.backend,
        "inputs": [tensor(t) for t in config.input],
        "outputs": [tensor(t) for t in config.output],
    }


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Any:
    from modelpress.scaleout.triton import write_triton_repository

    return write_triton_repository("minilm", tmp_path_factory.mktemp("triton") / "repo", batching=BATCHING)


def _full_dims(t: Any, batching: bool) -> list[int]:
    return [-1] * batching + list(t.dims)


def _compatible(a: list[int], b: list[int]) -> bool:
    return len(a) == len(b) and all(x == y or -1 in (x, y) for x, y in zip(a, b, strict=True))


def test_every_config_parses_with_tritons_proto_and_holds_our_settings(repo):
    import onnx

    pb2 = _triton_pb2()
    root, name, v = repo.path, repo.name, repo.version
    assert sorted(p.name for p in root.iterdir()) == sorted([name, f"{name}_model", f"{name}_postprocess", f"{name}_tokenize"])
    configs = {p.name: parse(p) for p in root.iterdir()}
    for model_name, c in configs.items():
        assert c.name == model_name and list(c.version_policy.specific.versions) == [int(v)]
        assert (root / model_name / v).is_dir()

    model = configs[f"{name}_model"]
    assert (model.backend, model.platform) == ("onnxruntime", "onnxruntime_onnx")
    assert model.max_batch_size == BATCHING.max_batch_size
    db = model.dynamic_batching
    assert db.max_queue_delay_microseconds == 2500
    assert db.default_queue_policy.max_queue_size == BATCHING.max_queue_size
    assert db.default_queue_policy.default_timeout_microseconds == 12_000_000
    assert db.default_queue_policy.timeout_action == pb2.ModelQueuePolicy.REJECT
    assert [(g.count, g.kind) for g in model.instance_group] == [(2, pb2.ModelInstanceGroup.KIND_CPU)]
    # the tensors are the ONNX file's own (batch axis dropped, dynamic axes -1)
    graph = onnx.load(str(root / f"{name}_model" / v / "model.onnx"), load_external_data=False).graph

    def onnx_tensor(vi: Any) -> tuple[str, str, list[int]]:
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
        return vi.name, "TYPE_" + {"INT64": "INT64", "FLOAT": "FP32"}[onnx.TensorProto.DataType.Name(tt.elem_type)], dims[1:]

    ours = [(t.name, pb2.DataType.Name(t.data_type), list(t.dims)) for t in model.input]
    assert ours == [onnx_tensor(i) for i in graph.input]
    outputs = {i.name: onnx_tensor(i) for i in graph.output}
    assert [(t.name, pb2.DataType.Name(t.data_type), list(t.dims)) for t in model.output] == [outputs["last_hidden_state"]]
    assert list(model.output[0].dims) == [-1, 384]

    tok, post, ens = configs[f"{name}_tokenize"], configs[f"{name}_postprocess"], configs[name]
    for c, stage in ((tok, "tokenize"), (post, "postprocess")):
        assert c.backend == "python" and c.max_batch_size == 0 and c.parameters["stage"].string_value == stage
        assert (root / c.name / v / "model.py").is_file() and (root / c.name / v / "settings.json").is_file()
    assert (root / tok.name / v / "tokenizer.json").is_file()
    assert [(t.name, pb2.DataType.Name(t.data_type), list(t.dims)) for t in tok.input] == [("text", "TYPE_STRING", [-1])]
    assert {t.name for t in tok.output} == {"input_ids", "attention_mask", "token_type_ids"}
    assert ens.platform == "ensemble" and ens.max_batch_size == 0
    assert ens.parameters["task"].string_value == "embedding" and ens.parameters["runtime"].string_value == "onnxruntime"
    assert [s.model_name for s in ens.ensemble_scheduling.step] == [tok.name, model.name, post.name]

    # the ensemble as Triton validates it (core/src/ensemble_utils.cc): every step input mapped, every mapped name
    # a tensor of the step's model, and one data type and compatible full shape (batch axis included) per ensemble tensor
    tensors: dict[str, tuple[int, list[int]]] = {t.name: (t.data_type, _full_dims(t, False)) for t in [*ens.input, *ens.output]}
    for step in ens.ensemble_scheduling.step:
        assert step.model_version == int(v)
        c = configs[step.model_name]
        batching = c.max_batch_size > 0
        inputs, outputs = {t.name: t for t in c.input}, {t.name: t for t in c.output}
        assert set(step.input_map) == set(inputs), step.model_name
        assert set(step.output_map) <= set(outputs), step.model_name
        for key, ens_name in [*step.input_map.items(), *step.output_map.items()]:
            t = inputs.get(key) or outputs[key]
            here = (t.data_type, _full_dims(t, batching))
            seen = tensors.setdefault(ens_name, here)
            assert seen[0] == here[0] and _compatible(seen[1], here[1]), (step.model_name, key, seen, here)


@pytest.mark.anyio
async def test_the_metadata_triton_reports_equals_our_servers(repo):
    import httpx

    from modelpress.rollout import RolloutServer
    from modelpress.serving.config import ModelConfig, ServerConfig

    triton = triton_metadata(parse(repo.path / repo.name), repo.path)
    server = RolloutServer(ServerConfig(access_log=False))
    transport = httpx.ASGITransport(server.app)
    async with server.running(), httpx.AsyncClient(transport=transport, base_url="http://modelpress.test", timeout=60) as c:
        await server.repository.load(ModelConfig(source="minilm", runtime="onnxruntime", batching=BATCHING))
        ours = (await c.get(f"/v2/models/{repo.name}")).json()
        body = {"inputs": [{"name": "text", "shape": [len(TEXTS)], "datatype": "BYTES", "data": TEXTS}]}
        answer = (await c.post(f"/v2/models/{repo.name}/infer", json=body)).json()
    for key in ("name", "versions", "inputs", "outputs"):
        assert ours[key] == triton[key], key
    assert triton["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert triton["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, 384]}]
    # the platform names the engine: ours the runtime, Triton's the ensemble whose model step runs on that runtime's backend
    model = parse(repo.path / f"{repo.name}_model")
    assert (ours["platform"], triton["platform"], model.backend) == ("modelpress_onnxruntime", "ensemble", "onnxruntime")

    # the repository's Python steps around its ONNX file answer what the server answers
    import onnxruntime as ort

    from modelpress.scaleout import triton_python_model as steps

    v = repo.version
    settings = __import__("json").loads((repo.path / f"{repo.name}_tokenize" / v / "settings.json").read_text())
    tokenizer = steps.load_tokenizer(repo.path / f"{repo.name}_tokenize" / v, settings["max_length"])
    tokens = steps.tokenize(TEXTS, tokenizer, settings, settings["tokenize_outputs"])
    session = ort.InferenceSession(str(repo.path / f"{repo.name}_model" / v / "model.onnx"), providers=["CPUExecutionProvider"])
    hidden = session.run(["last_hidden_state"], {n: tokens[n] for n in settings["input_names"]})[0]
    emb = steps.postprocess({"last_hidden_state": hidden}, tokens["attention_mask"], settings)["embedding"]
    served = np.asarray(answer["outputs"][0]["data"], dtype=np.float32).reshape(len(TEXTS), -1)
    np.testing.assert_allclose(emb, served, atol=EMBEDDING_ATOL)


class _PbUtils:
    """The three names of Triton's ``triton_python_backend_utils`` that model.py uses, as Triton documents them
    (``Tensor(name, array)`` with ``as_numpy()``, ``InferenceResponse(output_tensors=...)``, ``get_input_tensor_by_name``),
    so that the test can drive ``initialize`` and ``execute`` as Triton's Python backend does."""

    class Tensor:
        def __init__(self, name: str, array: np.ndarray) -> None:
            self._name, self._array = name, array

        def name(self) -> str:
            return self._name

        def as_numpy(self) -> np.ndarray:
            return self._array

    class InferenceResponse:
        def __init__(self, output_tensors: list[Any]) -> None:
            self.outputs = {t.name(): t.as_numpy() for t in output_tensors}

    @staticmethod
    def get_input_tensor_by_name(request: dict[str, Any], name: str) -> Any:
        return _PbUtils.Tensor(name, request[name])


def _python_step(repo: Any, stage: str) -> Any:
    """The step's model.py, initialized with the ``args`` Triton passes (its config as JSON, its folder, its version)."""
    from google.protobuf import json_format

    folder = repo.path / f"{repo.name}_{stage}"
    spec = importlib.util.spec_from_file_location(f"_triton_step_{stage}", folder / repo.version / "model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    config = json_format.MessageToJson(parse(folder), preserving_proto_field_name=True)
    model.initialize({"model_config": config, "model_repository": str(folder), "model_version": repo.version, "model_name": folder.name})
    return model


def test_the_ensemble_steps_run_as_tritons_python_backend_runs_them(repo, monkeypatch):
    """initialize + execute of both Python steps around the ONNX file, two requests in one execute call, give what
    the server's pipeline gives (tokenize -> runner -> task postprocess) on the same texts."""
    import onnxruntime as ort

    import modelpress as mp

    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _PbUtils)
    tokenize, post = _python_step(repo, "tokenize"), _python_step(repo, "postprocess")
    requests = [{"text": np.asarray([t.encode() for t in TEXTS], dtype=object)}, {"text": np.asarray([b"one more"], dtype=object)}]
    session = ort.InferenceSession(str(repo.path / f"{repo.name}_model" / repo.version / "model.onnx"), providers=["CPUExecutionProvider"])
    task = mp.task_for(mp.load("minilm"))
    for req, tokens in zip(requests, tokenize.execute(requests), strict=True):
        feeds = {n: tokens.outputs[n] for n in ("input_ids", "attention_mask", "token_type_ids")}
        hidden = session.run(["last_hidden_state"], feeds)[0]
        (answer,) = post.execute([{"last_hidden_state": hidden, "attention_mask": tokens.outputs["attention_mask"]}])
        texts = [t.decode() for t in req["text"]]
        batch = task.preprocess(texts)
        np.testing.assert_array_equal(tokens.outputs["input_ids"], batch["input_ids"])
        want = task.postprocess({"last_hidden_state": session.run(["last_hidden_state"], batch)[0]}, batch)
        np.testing.assert_allclose(answer.outputs["embedding"], want, atol=EMBEDDING_ATOL)


def test_openvino_backend(tmp_path):
    from modelpress.scaleout.triton import write_triton_repository

    repo = write_triton_repository("minilm", tmp_path / "repo", runtime="openvino", name="mini")  # the export cache's IR
    model = parse(repo.path / "mini_model")
    assert model.backend == "openvino" and not model.platform and model.name == "mini_model"
    assert (repo.path / "mini_model" / "1" / "model.xml").is_file() and (repo.path / "mini_model" / "1" / "model.bin").is_file()
    assert [t.name for t in model.input] == ["input_ids", "attention_mask", "token_type_ids"]
    assert triton_metadata(parse(repo.path / "mini"), repo.path)["outputs"] == [
        {"name": "embedding", "datatype": "FP32", "shape": [-1, 384]}
    ]


def test_text_classifier_configs_and_postprocess(tiny_classifier):
    """A classifier's ensemble answers label, label_id and scores as our server does (its signature is the one its
    ONNX export gets; the logits come from its torch runner, so no export is needed here)."""
    from google.protobuf import text_format

    import modelpress as mp
    from modelpress.runtimes.torch import load_torch_module
    from modelpress.scaleout import triton_python_model as steps
    from modelpress.scaleout.triton import to_pbtxt, triton_configs

    pb2 = _triton_pb2()
    art = mp.load(str(tiny_classifier))
    task = mp.task_for(art)
    _, sig = load_torch_module(art)
    configs, settings = triton_configs("sst", 3, task, sig, "onnxruntime", BATCHING, "sst:3")
    parsed = {n: text_format.Parse(to_pbtxt(c), pb2.ModelConfig()) for n, c in configs.items()}
    ens = parsed["sst"]
    assert [(t.name, pb2.DataType.Name(t.data_type), list(t.dims)) for t in ens.output] == [
        ("label", "TYPE_STRING", [-1]),
        ("label_id", "TYPE_INT64", [-1]),
        ("scores", "TYPE_FP32", [-1, 2]),
    ]
    assert ens.parameters["registry_ref"].string_value == "sst:3"
    assert [(t.name, list(t.dims)) for t in parsed["sst_model"].output] == [("logits", [2])]

    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(settings["tokenizer_json"])  # the tokenize step's tokenizer.json, as the writer saves it
    tokenizer.no_padding()
    tokenizer.enable_truncation(settings["max_length"])
    texts = ["a great film", "dull and far too long, i left early"]
    tokens = steps.tokenize(texts, tokenizer, settings, settings["tokenize_outputs"])
    np.testing.assert_array_equal(tokens["input_ids"], task.preprocess(texts)["input_ids"])
    runner = mp.create_runner(art, "torch", threads=1)
    try:
        logits = runner.run({n: tokens[n] for n in settings["input_names"]})
    finally:
        runner.close()
    got = steps.postprocess(logits, tokens["attention_mask"], settings)
    want = task.postprocess(logits, tokens)
    assert [x.decode() for x in got["label"]] == [w["label"] for w in want]
    assert got["label_id"].tolist() == [w["label_id"] for w in want]
    np.testing.assert_allclose(got["scores"], [w["scores"] for w in want], rtol=1e-6)


def test_bad_input_gets_a_clear_error(tiny_llama, tmp_path, monkeypatch):
    from modelpress.errors import ConfigError, ModelpressError, UnsupportedModelError
    from modelpress.scaleout.triton import write_triton_repository

    with pytest.raises(UnsupportedModelError, match="causal-lm model; Triton repositories are written for text models"):
        write_triton_repository(str(tiny_llama), tmp_path / "a")
    with pytest.raises(ConfigError, match="no backend here for the runtime 'tensorrt'"):
        write_triton_repository("minilm", tmp_path / "b", runtime="tensorrt")
    monkeypatch.setenv("MODELPRESS_HOME", str(tmp_path / "home"))
    with pytest.raises(ModelpressError) as err:
        write_triton_repository("nosuchmodel@production", tmp_path / "c")
    assert "nosuchmodel" in str(err.value)
    (tmp_path / "d").mkdir()
    with pytest.raises(ConfigError, match="already exists"):
        write_triton_repository("minilm", tmp_path / "d")


def test_cli_writes_the_repository_and_refuses_an_unknown_target(tmp_path):
    from typer.testing import CliRunner

    from modelpress.cli.main import app

    runner = CliRunner()
    r = runner.invoke(app, ["export", "minilm", "--to", "triton", str(tmp_path / "repo"), "--name", "enc", "--max-batch-size", "8"])
    assert r.exit_code == 0, r.output
    assert parse(tmp_path / "repo" / "enc_model").max_batch_size == 8
    r = runner.invoke(app, ["export", "minilm", "--to", "helm", str(tmp_path / "x")])
    assert r.exit_code == 2 and "'helm' is not a platform" in r.output and "kserve, triton" in r.output
    assert not (tmp_path / "x").exists()
