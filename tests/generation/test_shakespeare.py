"""The engines on the project's own character-level Llama (``shakespeare-lm``'s recipe, trained
briefly here: a different tokenizer from stories260k's, with newlines and one token per character)."""

from __future__ import annotations

import pytest
import torch

from modelpress.generation import SamplingParams, create_engine

from .test_torch_engine import reference_greedy

# A few seconds of training: enough for a model whose greedy continuation is text, not noise.
TINY = {"hidden_size": 64, "layers": 2, "heads": 4, "intermediate_size": 128, "max_steps": 80, "cpu_budget_s": 20.0}
GREEDY = SamplingParams(max_tokens=48, temperature=0, stop_token_ids=())


@pytest.fixture(scope="module")
def char_lm(tmp_path_factory, data_dir):
    from modelpress.zoo import shakespeare as sh

    if not (data_dir / "tinyshakespeare/input.txt").is_file():
        pytest.skip("tinyshakespeare is absent from the shared data folder")
    torch.manual_seed(0)
    art = sh.train(tmp_path_factory.mktemp("charlm") / "model", data_dir=data_dir, config=sh.ShakespeareConfig(**TINY), evaluate=False)
    return art


def test_character_model_greedy_equals_the_reference_and_streams_whole_text(char_lm, tmp_path):
    eng = create_engine(char_lm, engine="torch")
    eng.start()
    try:
        ids = eng.encode("ROMEO:\nWhat")
        r = eng.generate(ids, GREEDY)
        assert r.token_ids == reference_greedy(eng.model, ids, GREEDY.max_tokens)
        h = eng.submit(ids, GREEDY)
        assert "".join(e.text for e in h) == r.text == eng.decode(r.token_ids)
        pytest.importorskip("openvino", reason="the openvino engine needs openvino")
        fast = create_engine(char_lm, engine="openvino", quantize=None, cache_dir=tmp_path)
        fast.start()
        try:
            assert fast.generate(ids, GREEDY).token_ids == r.token_ids
        finally:
            fast.stop()
    finally:
        eng.stop()
