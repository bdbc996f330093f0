"""shakespeare-lm: the character tokenizer, the held-out split, the schedule, the cache, and a
short real training run whose model loads and scores through the normal paths."""

from __future__ import annotations

import itertools
import math

import pytest

import modelpress as mp
from modelpress.errors import ConfigError, ModelNotFoundError
from modelpress.zoo import shakespeare as sh

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Two OpenMP threads on the shared 2-core machine spin-wait each other: one is faster here."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_character_tokenizer_round_trips_and_saves(tmp_path):
    from transformers import AutoTokenizer

    tok = sh.build_tokenizer(TEXT)
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(TEXT) and tok.decode(ids) == TEXT  # one token per character, newlines included
    assert len(tok) == len(sh.SPECIAL_TOKENS) + len(set(TEXT)) and tok.bos_token_id == 1 and tok.pad_token_id == 0
    assert sh.encode_chars(TEXT, tok).tolist() == ids
    tok.save_pretrained(str(tmp_path))
    again = AutoTokenizer.from_pretrained(str(tmp_path))
    assert again(TEXT, add_special_tokens=False)["input_ids"] == ids
    assert again("Zq", add_special_tokens=False)["input_ids"] == [again.unk_token_id] * 2  # never-seen characters


def test_learning_rate_warms_up_then_decays_to_its_floor():
    cfg = sh.ShakespeareConfig()
    assert sh.lr_at(0.0, cfg) == 0.0 and sh.lr_at(cfg.warmup, cfg) == pytest.approx(cfg.lr)
    assert sh.lr_at(1.0, cfg) == pytest.approx(cfg.lr * cfg.min_lr_ratio) and sh.lr_at(2.0, cfg) == sh.lr_at(1.0, cfg)
    decay = [sh.lr_at(cfg.warmup + i * (1 - cfg.warmup) / 50, cfg) for i in range(51)]
    assert all(b < a for a, b in itertools.pairwise(decay))


def test_the_recipe_names_the_cache_and_threads_do_not_count():
    default, other = sh.ShakespeareConfig(), sh.ShakespeareConfig(cpu_budget_s=60)
    assert sh.ShakespeareConfig(threads=2).key() == default.key() != other.key()
    assert sh.cached_path(default).name == "shakespeare-lm" and sh.cached_path(other).name == f"shakespeare-lm-{other.key()}"
    assert sh.default_recipe() == default.recipe() and "threads" not in sh.default_recipe()
    with pytest.raises(ConfigError, match="must divide by heads"):
        sh.ShakespeareConfig(hidden_size=100, heads=6)


def test_an_untrained_model_says_how_to_make_it():
    with pytest.raises(ModelNotFoundError) as err:  # tests run in a fresh MODELPRESS_HOME
        sh.get_model_path()
    assert "scripts/train_shakespeare.py" in str(err.value)
    with pytest.raises(ModelNotFoundError, match="has not been trained"):
        mp.load("shakespeare-lm")


@pytest.mark.needs_data
def test_the_held_out_split_is_the_last_tenth_at_a_line(data_dir):
    from modelpress.datasets import load_dataset

    full = load_dataset("tinyshakespeare", data_dir_=data_dir).documents[0]
    train = load_dataset(sh.TRAIN_DATASET, data_dir_=data_dir).documents[0]
    test = load_dataset(sh.TEST_DATASET, data_dir_=data_dir).documents[0]
    assert train + test == full and train.endswith("\n")
    assert 0.09 < len(test) / len(full) < 0.11


class Steps:
    def __init__(self) -> None:
        self.done = 0

    def __call__(self, _desc, _total):
        def advance(n):
            self.done += n

        return advance


@pytest.mark.needs_data
def test_a_short_run_learns_is_cached_and_loads(data_dir, monkeypatch):
    cfg = sh.ShakespeareConfig(
        hidden_size=32, layers=1, heads=2, intermediate_size=64, context=32, batch_size=8, max_steps=80, cpu_budget_s=60, lr=1e-2
    )
    steps = Steps()
    path = sh.ensure_trained(data_dir=data_dir, config=cfg, progress=steps, evaluate=False)
    report = sh.training_report(path)
    art = mp.load(str(path))
    uniform = math.log(art.manifest.task_config["vocab_size"])
    assert report["steps"] == steps.done == 80 and report["stopped_by"] == "max_steps"
    assert report["heldout_loss"] < uniform - 0.8  # far better than guessing: it learned the letters' frequencies at least
    assert art.task == "causal-lm" and art.format == "hf" and art.manifest.step["recipe"] == cfg.recipe()

    # Cached: asking again trains nothing.
    monkeypatch.setattr(sh, "train", lambda *a, **k: pytest.fail("trained again although cached"))
    assert sh.ensure_trained(data_dir=data_dir, config=cfg) == path
    ppl = mp.evaluate(str(path), data=sh.TEST_DATASET, data_dir=data_dir, threads=1, task_options={"max_eval_tokens": 2000})["metrics"][
        "perplexity"
    ]
    assert ppl < math.exp(uniform - 0.8)

    # The short name resolves to the model cached under the default recipe (stood in for here by this one).
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sh.write_model(
        sh.cached_path(),
        AutoModelForCausalLM.from_pretrained(str(path)),
        AutoTokenizer.from_pretrained(str(path)),
        sh.ShakespeareConfig(),
        report,
        evaluate=False,
    )
    assert mp.load("shakespeare-lm").path == sh.cached_path()
