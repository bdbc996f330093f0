import numpy as np
import pytest

import modelpress as mp
from modelpress.datasets import PairDataset
from modelpress.tasks.embedding import agreement_metrics, normalize, pool, read_sentence_transformers_config

# sentence-transformers reports Spearman on STS-B dev for the same model and pairs; the issue
# asks for agreement within 0.005 (both compute cosine on the same embeddings up to fp32 noise).
SPEARMAN_TOLERANCE = 0.005


def test_pooling_modes_exact():
    hidden = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
    mask = np.array([[1, 1, 0], [1, 1, 1]])
    np.testing.assert_allclose(pool(hidden, mask, "mean"), [[1, 2], [8, 9]])
    np.testing.assert_allclose(pool(hidden, mask, "cls"), [[0, 1], [6, 7]])
    np.testing.assert_allclose(pool(hidden, mask, "max"), [[2, 3], [10, 11]])
    np.testing.assert_allclose(pool(hidden, mask, "lasttoken"), [[2, 3], [10, 11]])
    with pytest.raises(ValueError, match="pooling"):
        pool(hidden, mask, "median")


def test_agreement_metrics_exact():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(30, 8))
    same = agreement_metrics(a, a.copy())
    assert same["mean_cosine"] == pytest.approx(1.0) and same["top10_agreement"] == 1.0
    flipped = agreement_metrics(a, -a)
    assert flipped["min_cosine"] == pytest.approx(-1.0)
    noisy = agreement_metrics(a + rng.normal(scale=0.5, size=a.shape), a)
    assert 0.5 < noisy["mean_cosine"] < 0.99 and 0 < noisy["top10_agreement"] < 1


def test_sentence_transformers_config_read(minilm_path):
    cfg = read_sentence_transformers_config(minilm_path)
    assert cfg == {"normalize": True, "pooling": "mean", "max_length": 256}


def test_embedding_matches_manual_torch(tiny_encoder):
    import torch
    from transformers import AutoModel, AutoTokenizer

    art = mp.load(tiny_encoder)
    assert art.task == "embedding" and art.manifest.task_config["normalize"] is True
    task = mp.task_for(art)
    texts = ["a short one", "a somewhat longer sentence with more words"]
    emb = task.embed(mp.create_runner(art, "torch", threads=1), texts, batch_size=1)
    tok = AutoTokenizer.from_pretrained(str(tiny_encoder))
    model = AutoModel.from_pretrained(str(tiny_encoder)).eval()
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    m = enc["attention_mask"][..., None].float()
    ref = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy()
    np.testing.assert_allclose(emb, ref, atol=1e-5)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_evaluate_spearman_on_handmade_pairs(tiny_encoder):
    ds = PairDataset(
        "toy", ["a cat", "a dog", "the sky", "green tea"], ["a cat", "a puppy", "an ocean", "black coffee"], [5.0, 4.0, 1.0, 2.0]
    )
    art = mp.load(tiny_encoder)
    metrics = mp.task_for(art).evaluate(mp.create_runner(art, "torch", threads=1), ds)
    assert -1.0 <= metrics["spearman"] <= 1.0 and metrics["pairs"] == 4


def test_wrong_dataset_kind_is_refused(tiny_encoder):
    from modelpress.datasets import LabeledTextDataset
    from modelpress.errors import DatasetError

    art = mp.load(tiny_encoder)
    with pytest.raises(DatasetError, match="needs PairDataset"):
        mp.task_for(art).evaluate(mp.create_runner(art, "torch"), LabeledTextDataset("x", ["a"], [0], ["n"]))


@pytest.mark.needs_data
@pytest.mark.slow
def test_stsb_spearman_matches_sentence_transformers(data_dir, minilm_path):
    """The issue's check: our Spearman on STS-B dev is within 0.005 of sentence-transformers'."""
    from scipy.stats import spearmanr
    from sentence_transformers import SentenceTransformer

    from modelpress.datasets import load_dataset

    ours = mp.evaluate("minilm", task="embedding", data="stsb-dev", data_dir=data_dir, threads=2)["metrics"]["spearman"]
    ds = load_dataset("stsb-dev", data_dir_=data_dir)
    st = SentenceTransformer(str(minilm_path), device="cpu")
    a = st.encode(ds.sentences1, batch_size=64, convert_to_numpy=True, normalize_embeddings=True)
    b = st.encode(ds.sentences2, batch_size=64, convert_to_numpy=True, normalize_embeddings=True)
    theirs = spearmanr((a * b).sum(1), ds.scores).statistic
    assert abs(ours - theirs) <= SPEARMAN_TOLERANCE, (ours, theirs)
    assert ours > 0.85  # the model card says about 0.82 on STS-B test; dev is higher (0.867)


def test_normalize_handles_zero_vectors():
    out = normalize(np.zeros((2, 3)))
    assert np.isfinite(out).all()
