import json

import pytest

import modelpress as mp
from modelpress.errors import ModelNotFoundError, TaskMismatchError, UnknownTaskError, UnsupportedModelError


def test_short_name_and_aliases(minilm_path):
    art = mp.load("minilm")
    assert art.path == minilm_path.resolve() and art.task == "embedding" and art.format == "hf"
    assert art.manifest.task_config["pooling"] == "mean" and art.manifest.task_config["max_length"] == 256
    assert mp.load("all-MiniLM-L6-v2").path == art.path


def test_task_inference_from_hf_folders(tiny_encoder, tiny_classifier, tiny_llama):
    assert mp.load(tiny_encoder).task == "embedding"
    assert mp.load(tiny_classifier).task == "text-classification"
    assert mp.load(tiny_llama).task == "causal-lm"


def test_plain_encoder_without_sentence_transformers_files(tmp_path, tiny_encoder):
    import shutil

    plain = tmp_path / "plain"
    shutil.copytree(tiny_encoder, plain)
    (plain / "modules.json").unlink()
    art = mp.load(plain)
    assert art.task == "embedding" and art.manifest.task_config["pooling"] == "mean" and art.manifest.task_config["normalize"] is False


@pytest.mark.needs_data
def test_stories260k_loads_offline(data_dir):
    art = mp.load(data_dir / "models/stories260k")
    assert art.task == "causal-lm" and art.manifest.task_config["bos_token_id"] == 1


def test_onnx_file_with_inferred_task_and_tokenizer(tiny_encoder, tmp_path):
    mp.export(tiny_encoder, "onnx", tmp_path / "e")
    (tmp_path / "e/modelpress.json").unlink()  # a bare ONNX file as a user would bring it
    art = mp.load(tmp_path / "e/model.onnx")
    assert art.format == "onnx" and art.task == "embedding" and art.manifest.signature.output_names == ["last_hidden_state"]
    task = mp.task_for(art)
    assert task.embed(mp.create_runner(art, "onnxruntime"), ["hello"]).shape == (1, 32)


def test_torch_module_needs_a_task(tiny_cnn):
    with pytest.raises(TaskMismatchError, match="needs a task"):
        mp.load(tiny_cnn)
    art = mp.load(tiny_cnn, task="image-classification")
    assert art.format == "torch" and art.path is None and art.manifest.signature.input_names == ["pixel_values"]
    assert len(art.content_hash()) == 64


def test_text_module_takes_a_tokenizer(tiny_encoder):
    import torch
    from transformers import AutoModel

    from modelpress.tasks._wrappers import EncoderOutput

    module = EncoderOutput(AutoModel.from_pretrained(str(tiny_encoder)), "last_hidden_state")
    art = mp.load(module, task="embedding", tokenizer=tiny_encoder, task_config={"pooling": "mean", "normalize": True})
    task = mp.task_for(art)
    emb = task.embed(mp.create_runner(art, "torch"), ["a b c"])
    ref = task.embed(mp.create_runner(mp.load(tiny_encoder), "torch"), ["a b c"])
    assert torch.allclose(torch.from_numpy(emb), torch.from_numpy(ref), atol=1e-6)


def test_errors_say_what_to_do(tmp_path):
    with pytest.raises(ModelNotFoundError, match="neither an existing path nor a known short name") as err:
        mp.load(tmp_path / "missing")
    assert "minilm" in str(err.value)
    with pytest.raises(UnknownTaskError, match="Known tasks: causal-lm, embedding"):
        mp.load("minilm", task="summarization")
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(UnsupportedModelError, match="not a model file"):
        mp.load(tmp_path / "weights.bin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnsupportedModelError, match="holds no model"):
        mp.load(tmp_path / "empty")
    with pytest.raises(UnsupportedModelError, match="Cannot load a int"):
        mp.load(3)
    bad = tmp_path / "badcfg"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    with pytest.raises(UnsupportedModelError, match=r"config\.json"):
        mp.load(bad)


def test_model_that_does_not_fit_the_task(tiny_encoder):
    art = mp.load(tiny_encoder, task="causal-lm")
    with pytest.raises(TaskMismatchError, match="could not be loaded as a causal-lm model"):
        mp.create_runner(art, "torch").load()


def test_artifact_task_conflict(tiny_cnn, tmp_path):
    mp.export(mp.load(tiny_cnn, task="image-classification"), "onnx", tmp_path / "c")
    with pytest.raises(TaskMismatchError, match="is a image-classification artifact"):
        mp.load(tmp_path / "c", task="embedding")


def test_info_describes_signature_and_parameters(tiny_encoder):
    data = mp.info(tiny_encoder)
    assert data["task"] == "embedding" and data["architecture"] == "BertModel"
    assert data["signature"]["outputs"][0]["name"] == "last_hidden_state"
    from safetensors.torch import load_file

    assert data["parameters"] == sum(t.numel() for t in load_file(str(tiny_encoder / "model.safetensors")).values())
