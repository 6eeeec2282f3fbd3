"""The fusion classifier recipe: model shape, training, ONNX export, artifact, evaluation.

Runs on small synthetic data (a few hundred rows) so it needs no encoders, database or
network; one short training run is shared by the tests that need a trained model.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import zipfile
from collections import Counter
from io import BytesIO

import numpy as np
import pytest

from shelver.training.dataset import TrainingData
from shelver.training.evaluate import (
    choose_level_thresholds,
    choose_threshold,
    evaluate,
    loosest_threshold,
    surest_threshold,
)
from shelver.training.export import check_parity, to_onnx
from shelver.training.fit import (
    LinearModel,
    TrainParams,
    _fit_one,
    balanced_index,
    choose_linear_weight,
    class_weights,
    fit_linear,
    fit_model,
    lexical_matrix,
    lexical_of,
    reads_photo_term,
    refit_linear,
    split_for,
    train,
    tree_key,
)
from shelver.training.hierarchy import hierarchical_metrics
from shelver.training.holdout import score_model
from shelver.training.model import ModelShape, build_ensemble, build_model
from shelver.worker import fusion
from shelver.worker.fusion import (
    ArtifactRejected,
    FusionModel,
    build_artifact,
    fusion_inputs,
    sha256_hex,
)
from shelver.worker.inputs import ModelInputs, ProductContent, UnknownTextPacking, pack_texts
from shelver.worker.lexical import (
    PHOTO_TERM,
    LexicalParams,
    LexicalVocabulary,
    analyze,
    fit_vocabulary,
)

BLOCKS = {"w": 0, "c": 1, "nw": 2, "nc": 3}

LABELS = ["Cameras", "Phones", "Washers"]
WORDS = {
    "Cameras": ["mirrorless", "lens", "megapixel", "zoom"],
    "Phones": ["smartphone", "sim", "unlocked", "5g"],
    "Washers": ["drum", "spin", "laundry", "kg"],
}
IMAGE_DIM = 24


def synthetic(n: int = 360, seed: int = 0) -> TrainingData:
    """Three classes told apart by words, a noisy text embedding and (for some) an image."""
    rng = np.random.default_rng(seed)
    labels = [LABELS[i % 3] for i in range(n)]
    texts, names, text_emb = [], [], np.zeros((n, 384), np.float32)
    image_emb = rng.normal(size=(n, IMAGE_DIM)).astype(np.float32)
    for i, label in enumerate(labels):
        k = LABELS.index(label)
        words = rng.choice(WORDS[label], size=2, replace=False)
        names.append(f"Brand{rng.integers(20)} {words[0]} model {rng.integers(900)}")
        texts.append(f"{names[-1]}. {words[1]}")
        text_emb[i] = rng.normal(scale=0.5, size=384)
        text_emb[i, k * 10 : k * 10 + 10] += 1.0
        image_emb[i, k] += 2.0
    text_emb /= np.linalg.norm(text_emb, axis=1, keepdims=True)
    present = (rng.random(n) < 0.6).astype(np.float32)
    return TrainingData(ModelInputs(texts, names, text_emb, image_emb, present), labels)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    report_dir = tmp_path_factory.mktemp("report")
    data = synthetic()
    params = TrainParams(
        epochs=4,
        batch_size=32,
        # The default featurizer (name block included), smaller.
        lexical=dataclasses.replace(TrainParams().lexical, max_terms=2000),
        encoders={"text": {"name": "test-text"}, "image": {"name": "test-image"}},
    )
    return data, train(data, params, report_dir), report_dir


def test_model_has_the_specified_branch_shapes():
    model = build_model(ModelShape(num_classes=7, image_dim=1280, lexical_vocab_size=50))
    units = {layer.name: layer.units for layer in model.layers if hasattr(layer, "units")}
    assert units == {
        "text1_dense": 256,
        "text2_dense": 128,
        "image1_dense": 512,
        "image2_dense": 256,
        "head1_dense": 256,
        "head2_dense": 128,
        "logits": 7,
    }
    assert model.get_layer("image1_dense").kernel.shape == (1280, 512)
    # fusion = text 128 + image 256 + present flag 1 + lexical 128
    assert model.get_layer("fusion").output.shape[-1] == 128 + 256 + 1 + 128
    assert [t.name for t in model.inputs] == [
        "text_emb", "image_emb", "image_present", "lex_ids", "lex_weights",
    ]  # fmt: skip
    assert model.output.shape[-1] == 7


def test_training_exports_an_artifact_that_matches_keras(trained):
    data, result, _ = trained
    assert result.metrics["onnx_parity_max_abs_diff"] <= 1e-4
    assert result.sha256 == sha256_hex(result.artifact)
    model = FusionModel.from_artifact(result.artifact, result.sha256)
    assert model.labels == LABELS
    assert model.threshold == pytest.approx(result.threshold)
    assert model.meta["encoders"]["text"]["name"] == "test-text"
    assert model.meta["lexical"]["terms"]  # vocabulary travels with the model
    assert {"lex_ids", "lex_weights"} <= set(model.meta["inputs"])
    assert model.vocabulary.reads_names and any(t.startswith("nw:") for t in model.vocabulary.terms)
    # How the training texts were packed travels with the model, by name.
    assert model.meta["text_packing"] == model.text_packing == "name. description"
    assert 0.0 <= result.metrics["linear_weight"] <= 1.0
    # The linear part's (vocabulary x classes) table, at scale the graph's largest
    # weight, is stored in half precision (training.fit.TABLE_DTYPE), yet matched Keras.
    import onnx

    with zipfile.ZipFile(BytesIO(result.artifact)) as archive:
        graph = onnx.load_from_string(archive.read(fusion.MODEL_MEMBER)).graph
    (table,) = [t for t in graph.initializer if t.dims[:1] == [model.vocabulary.size]]
    assert list(table.dims) == [model.vocabulary.size, len(LABELS)]
    assert table.data_type == onnx.TensorProto.FLOAT16
    # The open-set gate travels with the served model, its floor chosen on validation.
    gate = model.open_set
    assert gate is not None and gate.roots == LABELS and 0.0 <= gate.floor <= 1.0
    assert FusionModel.from_artifact(result.eval_artifact, result.eval_sha256).open_set == gate
    # Even four epochs learn this easy task: served predictions are mostly right.
    test = data.subset(result.split.test)
    probs = model.predict(test.inputs)
    assert probs.shape == (len(test.labels), 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    accuracy = np.mean(
        [model.labels[k] == y for k, y in zip(probs.argmax(1), test.labels, strict=True)]
    )
    assert accuracy > 0.8
    assert score_model(model, data, result.split.test)["accuracy"] == pytest.approx(accuracy)


def test_served_artifact_refits_the_linear_part_and_the_evaluated_one_is_kept(trained):
    data, result, _ = trained
    assert result.eval_artifact and result.eval_artifact != result.artifact
    evaluated = FusionModel.from_artifact(result.eval_artifact, result.eval_sha256)
    # The test figures are the evaluated artifact's, not the refitted one's.
    assert score_model(evaluated, data, result.split.test)["macro_f1"] == pytest.approx(
        result.metrics["test"]["macro_f1"]
    )
    served = FusionModel.from_artifact(result.artifact, result.sha256)
    assert served.meta["linear_refit_rows"] == len(data.labels)
    assert result.metrics["served"]["linear_part_refit_on_rows"] == len(data.labels)
    assert served.threshold == evaluated.threshold and served.labels == evaluated.labels


def test_refit_linear_is_the_fit_on_every_row():
    data = synthetic(n=120, seed=3)
    lexical = dataclasses.replace(TrainParams().lexical, max_terms=2000)
    params = TrainParams(epochs=2, batch_size=32, lexical=lexical)
    fitted = fit_model(data, split_for(data, params), params)
    refitted = refit_linear(fitted, data)
    coef, bias = refitted.model.get_layer("linear").get_weights()
    # The network reads no bag, so the vocabulary is refitted on every row too.
    texts, names = data.inputs.texts, data.inputs.names
    assert refitted.vocabulary == fit_vocabulary(texts, fitted.vocabulary.params, names)
    features = lexical_of(refitted.vocabulary, data, photos=False)  # flat labels
    y = np.array([LABELS.index(label) for label in data.labels])
    cold, _ = fit_linear(features, y, num_classes=3, c=params.linear_c)
    np.testing.assert_allclose(
        LinearModel(coef, bias).predict_proba(features), cold.predict_proba(features), atol=5e-3
    )
    assert refitted.network is fitted.network and refitted.vocabulary != fitted.vocabulary


def test_report_has_baseline_side_by_side_and_pngs(trained):
    _, result, report_dir = trained
    metrics = result.metrics
    assert set(metrics["baseline"]) >= {"macro_f1", "accuracy"}
    assert isinstance(metrics["beats_baseline"], bool)
    assert 0.0 <= metrics["test"]["coverage"] <= 1.0
    json.dumps(metrics)  # the registry stores it as jsonb
    for name in ("confusion_matrix.png", "reliability.png", "metrics.json"):
        assert (report_dir / name).stat().st_size > 1000 or name == "metrics.json"
    assert (report_dir / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    split = result.split
    assert not set(split.test) & (set(split.train) | set(split.val))


def test_tampered_artifact_is_rejected(trained):
    _, result, _ = trained
    tampered = bytearray(result.artifact)
    tampered[len(tampered) // 2] ^= 0xFF
    with pytest.raises(ArtifactRejected, match="sha256"):
        FusionModel.from_artifact(bytes(tampered), result.sha256)
    # A well-formed zip vouched for by its own hash but with a foreign format version.
    with zipfile.ZipFile(BytesIO(result.artifact)) as archive:
        meta = json.loads(archive.read("meta.json"))
        onnx_bytes = archive.read("model.onnx")
    meta["format_version"] = 9
    buffer = BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("meta.json", json.dumps(meta))
        archive.writestr("model.onnx", onnx_bytes)
    future = buffer.getvalue()
    with pytest.raises(ArtifactRejected, match="format"):
        FusionModel.from_artifact(future, sha256_hex(future))


def repackaged(artifact: bytes, **meta_changes) -> bytes:
    """The artifact's model under changed meta, vouched for by its own new hash."""
    with zipfile.ZipFile(BytesIO(artifact)) as archive:
        meta = json.loads(archive.read("meta.json"))
        onnx_bytes = archive.read("model.onnx")
    buffer = BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("meta.json", json.dumps({**meta, **meta_changes}))
        archive.writestr("model.onnx", onnx_bytes)
    return buffer.getvalue()


def test_a_model_packed_in_a_way_this_worker_does_not_know_is_refused(trained):
    _, result, _ = trained
    for packing in ("{description} / {name}", {"template": "{description}"}, None):
        foreign = repackaged(result.artifact, text_packing=packing)
        with pytest.raises(ArtifactRejected, match="text packing .* is not one this version"):
            FusionModel.from_artifact(foreign, sha256_hex(foreign))
    meta = {"labels": ["a"], "threshold": 0.5, "encoders": {}, "text_dim": 4, "image_dim": 4}
    with pytest.raises(UnknownTextPacking):
        build_artifact(b"onnx", {**meta, "text_packing": "shouted"})
    product = ProductContent(1, "", "Canon EOS R50", "Mirrorless camera", None)
    with pytest.raises(UnknownTextPacking):
        pack_texts([product], "shouted")


def test_an_older_models_unnamed_packing_reads_as_name_dot_description(trained):
    # Artifacts before packings had names (the first bundled model among them) carry the
    # template itself.
    _, result, _ = trained
    older = repackaged(
        result.artifact, text_packing={"template": "{name}. {description}", "max_tokens": 256}
    )
    model = FusionModel.from_artifact(older, sha256_hex(older))
    assert model.text_packing == "name. description"
    product = ProductContent(1, "", "Canon EOS R50", "Mirrorless camera", None)
    assert pack_texts([product], model.text_packing) == ["Canon EOS R50. Mirrorless camera"]


def test_missing_image_is_served_from_text_alone(trained):
    data, result, _ = trained
    model = FusionModel.from_artifact(result.artifact, result.sha256)
    rows = data.inputs.subset(np.arange(12))
    absent = dataclasses.replace(rows, image_present=np.zeros(12, np.float32))
    garbage = np.random.default_rng(1).normal(size=rows.image_emb.shape).astype(np.float32) * 100
    a = model.predict(absent)
    b = model.predict(dataclasses.replace(absent, image_emb=garbage))
    np.testing.assert_array_equal(a, b)  # whatever sits in image_emb, it is ignored
    assert np.isfinite(a).all()


def test_a_batch_scores_each_row_as_that_row_alone(trained, monkeypatch):
    """predict() reorders rows by their lexical term counts and pads each run to its
    own longest row; every row must still get its own probabilities back."""
    data, result, _ = trained
    model = FusionModel.from_artifact(result.artifact, result.sha256)
    assert model.vocabulary is not None
    monkeypatch.setattr(fusion, "LENGTH_BUCKET", 7)  # several runs in a batch of 40
    rows = data.inputs.subset(np.arange(40))
    batch = model.predict(rows)
    alone = np.concatenate([model.predict(rows.subset([i])) for i in range(40)])
    lengths = np.count_nonzero(fusion_inputs(model.vocabulary, rows)["lex_ids"], axis=1)
    assert len(set(lengths.tolist())) > 5  # the rows really differ in length
    np.testing.assert_allclose(batch, alone, atol=1e-6)


def test_model_inputs_keep_their_rows_together():
    data = synthetic(n=10)
    inputs = data.inputs
    picked = inputs.subset([7, 2])
    assert picked.texts == [inputs.texts[7], inputs.texts[2]]
    np.testing.assert_array_equal(picked.image_emb, inputs.image_emb[[7, 2]])
    again = ModelInputs.concat([inputs.subset(slice(0, 4)), inputs.subset(slice(4, None))])
    np.testing.assert_array_equal(again.text_emb, inputs.text_emb)
    assert again.names == inputs.names and len(again) == 10
    with pytest.raises(ValueError, match="same rows"):
        dataclasses.replace(inputs, names=inputs.names[:9])
    with pytest.raises(UnknownTextPacking):
        dataclasses.replace(inputs, text_packing="{name}")


def test_artifact_bytes_are_reproducible(trained):
    _, result, _ = trained
    with zipfile.ZipFile(BytesIO(result.artifact)) as archive:
        meta = json.loads(archive.read("meta.json"))
        onnx_bytes = archive.read("model.onnx")
    assert build_artifact(onnx_bytes, meta) == result.artifact


def test_linear_model_mixed_in_the_graph_matches_its_numpy_form():
    data = synthetic(n=90)
    vocab = fit_vocabulary(data.inputs.texts, LexicalParams(min_df=1))
    features = lexical_matrix(vocab, data.inputs.texts)
    y = np.array([LABELS.index(label) for label in data.labels])
    linear, _ = fit_linear(features, y, num_classes=3, c=10.0)
    mlp = build_model(ModelShape(num_classes=3, image_dim=IMAGE_DIM))
    mixed = build_ensemble(mlp, linear.coef, linear.bias, linear_weight=0.7)
    feeds = fusion_inputs(vocab, data.inputs)
    expected = 0.7 * linear.predict_proba(features) + 0.3 * np.asarray(
        mlp.predict({k: feeds[k] for k in ("text_emb", "image_emb", "image_present")}, verbose=0)
    )
    np.testing.assert_allclose(mixed.predict(feeds, verbose=0), expected, atol=1e-5)
    assert check_parity(to_onnx(mixed), mixed, feeds) <= 1e-4


def test_binary_linear_model_keeps_scikit_learns_probabilities():
    data = synthetic(n=60)
    two = [i for i, label in enumerate(data.labels) if label != "Washers"]
    texts = [data.inputs.texts[i] for i in two]
    y = np.array([LABELS.index(data.labels[i]) for i in two])
    features = lexical_matrix(fit_vocabulary(texts, LexicalParams(min_df=1)), texts)
    linear, estimator = fit_linear(features, y, num_classes=3, c=1.0)
    probs = linear.predict_proba(features)
    # Up to the table's half precision (TABLE_DTYPE): about 1e-4 here.
    np.testing.assert_allclose(probs[:, :2], estimator.predict_proba(features), atol=5e-4)
    assert probs[:, 2].max() < 1e-6  # a class with no training rows is never predicted


def test_linear_share_ties_go_to_the_linear_model():
    y = np.array([0, 1, 0, 1])
    right = np.eye(2)[y]
    assert choose_linear_weight(y, right, right, (0.0, 0.5, 1.0)) == 1.0
    assert choose_linear_weight(y, right, 1 - right, (0.0, 0.5, 1.0)) == 1.0
    assert choose_linear_weight(y, 1 - right, right, (0.0, 0.5, 1.0)) == 0.0


def test_lexical_features_round_trip_through_json():
    texts = ["Canon EOS mirrorless camera", "canon lens 50mm", "Samsung phone 5G", "samsung tv"]
    vocab = fit_vocabulary(texts, LexicalParams(min_df=1, max_terms=500))
    again = LexicalVocabulary.from_json(json.loads(json.dumps(vocab.to_json())))
    ids, weights = vocab.transform(["canon camera", "nothing known ###"])
    ids2, weights2 = again.transform(["canon camera", "nothing known ###"])
    np.testing.assert_array_equal(ids, ids2)
    np.testing.assert_allclose(weights, weights2, rtol=1e-6)
    assert np.linalg.norm(weights[0]) == pytest.approx(1.0, abs=1e-6)
    assert "w:canon" in vocab.terms and "c: ca" in vocab.terms
    # "nothing known" shares no term with the vocabulary except char n-grams it may hit;
    # an empty text is pure padding.
    empty_ids, empty_w = vocab.transform([""])
    assert empty_ids.tolist() == [[0]] and empty_w.tolist() == [[0.0]]


def test_tfidf_union_analyzer_sees_what_the_baseline_sees():
    from sklearn.feature_extraction.text import TfidfVectorizer

    text = "Apple iPhone-7, 32GB Space  Grey (Unlocked) a"
    params = LexicalParams(analyzer="tfidf_union")
    terms = analyze(text, params)
    word = TfidfVectorizer(ngram_range=(1, 2)).build_analyzer()
    char = TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5)).build_analyzer()
    assert sorted(t[2:] for t in terms if t.startswith("w:")) == sorted(word(text))
    assert sorted(t[2:] for t in terms if t.startswith("c:")) == sorted(char(text))
    vocab = fit_vocabulary([text, "samsung grey phone"], params)
    ids, weights = vocab.transform([text])
    is_word = np.array([vocab.terms[i - 1].startswith("w:") for i in ids[0]])
    # Each block has unit length on its own, as in a FeatureUnion of two vectorizers.
    assert np.linalg.norm(weights[0][is_word]) == pytest.approx(1.0, abs=1e-6)
    assert np.linalg.norm(weights[0][~is_word]) == pytest.approx(1.0, abs=1e-6)


def test_name_block_is_the_baselines_features_of_the_name_beside_those_of_the_text():
    import scipy.sparse as sp
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import FeatureUnion

    def union():
        return FeatureUnion([
            ("word", TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)),
            ("char", TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), sublinear_tf=True,
                                     min_df=2)),
        ])  # fmt: skip

    names = ["Canon EOS R50", "Samsung Galaxy S9 case", "Canon lens 50mm", "Samsung TV 55in"]
    texts = [
        f"{n}. {d}"
        for n, d in zip(names, ["Mirrorless camera.", "Fits Galaxy phones.", "Prime lens for "
                                "Canon cameras.", "4K television from Samsung."], strict=True)
    ]  # fmt: skip
    params = LexicalParams(analyzer="tfidf_union", word_min_df=1, name_weight=0.5)
    vocab = fit_vocabulary(texts, params, names=names)
    ours = lexical_matrix(vocab, texts, names).toarray()
    text_union, name_union = union().fit(texts), union().fit(names)
    theirs = sp.hstack([text_union.transform(texts), 0.5 * name_union.transform(names)]).toarray()
    # Same values once each vocabulary's columns are put in the other's order.
    columns = [f"{b}:{t}" for b, t in (
        [("w", t) for t in text_union.transformer_list[0][1].get_feature_names_out()]
        + [("c", t) for t in text_union.transformer_list[1][1].get_feature_names_out()]
        + [("nw", t) for t in name_union.transformer_list[0][1].get_feature_names_out()]
        + [("nc", t) for t in name_union.transformer_list[1][1].get_feature_names_out()]
    )]  # fmt: skip
    assert sorted(columns) == sorted(vocab.terms)
    order = [vocab.terms.index(c) + 1 for c in columns]
    np.testing.assert_allclose(ours[:, order], theirs, atol=1e-6)

    again = LexicalVocabulary.from_json(json.loads(json.dumps(vocab.to_json())))
    np.testing.assert_allclose(lexical_matrix(again, texts, names).toarray(), ours, atol=1e-6)
    with pytest.raises(ValueError, match="pass names"):
        vocab.transform(texts)
    with pytest.raises(ValueError, match="3 names"):
        vocab.transform(texts, names[:3])


def test_photo_term_is_one_more_term_outside_the_norms_only_where_a_photo_is():
    names = ["Canon EOS R50", "Samsung Galaxy S9 case", "Canon lens 50mm"]
    texts = [f"{n}. For shoppers." for n in names]
    plain = LexicalParams(analyzer="tfidf_union", word_min_df=1, name_weight=0.5)
    with_photo = dataclasses.replace(plain, photo_weight=0.5)
    vocab = fit_vocabulary(texts, with_photo, names=names)
    assert vocab.terms[-1] == PHOTO_TERM
    assert vocab.terms[:-1] == fit_vocabulary(texts, plain, names=names).terms
    photos = np.array([1.0, 0.0, 1.0], np.float32)
    ours = lexical_matrix(vocab, texts, names, photos).toarray()
    photo_column = vocab.photo_id
    assert photo_column == vocab.size - 1  # the last term
    assert ours[:, photo_column].tolist() == [0.5, 0.0, 0.5]
    # Every other weight is the plain vocabulary's, photo or not.
    np.testing.assert_allclose(
        ours[:, :photo_column],
        lexical_matrix(fit_vocabulary(texts, plain, names=names), texts, names).toarray(),
        atol=1e-6,
    )
    ids, weights = vocab.transform(texts, names, photos)
    assert ids[0][weights[0] > 0][-1] == photo_column  # last in its row
    again = LexicalVocabulary.from_json(json.loads(json.dumps(vocab.to_json())))
    assert again.params.photo_weight == 0.5
    np.testing.assert_allclose(
        lexical_matrix(again, texts, names, photos).toarray(), ours, atol=1e-6
    )
    with pytest.raises(ValueError, match="pass photos"):
        vocab.transform(texts, names)
    with pytest.raises(ValueError, match="2 photo flags"):
        vocab.transform(texts, names, photos[:2])
    # A vocabulary from before the option reads no flags and ignores them.
    old = fit_vocabulary(texts, plain, names=names)
    np.testing.assert_array_equal(
        old.transform(texts, names, photos)[0], old.transform(texts, names)[0]
    )


def test_evaluation_figures_on_a_hand_made_example(tmp_path):
    labels = ["a", "b"]
    y = ["a", "a", "a", "b", "b"]
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.3, 0.7], [0.45, 0.55]])
    m = evaluate(y, probs, labels, threshold=0.7, report_dir=tmp_path)
    assert m["accuracy"] == pytest.approx(0.8)
    # a: P=1, R=2/3, F1=0.8; b: P=2/3, R=1, F1=0.8
    assert m["per_class"]["a"]["recall"] == pytest.approx(2 / 3)
    assert m["per_class"]["b"]["precision"] == pytest.approx(2 / 3)
    assert m["macro_f1"] == pytest.approx(0.8)
    assert m["confusion_matrix"] == [[2, 1], [0, 2]]
    # Accepted at 0.7: 0.9, 0.8, 0.7 -> 3/5 rows, all right.
    assert m["coverage"] == pytest.approx(0.6)
    assert m["precision_at_threshold"] == pytest.approx(1.0)
    # ECE: bins (0.5,0.6] {0.6 wrong, 0.55 right}, (0.6,0.7] {0.7 right}, (0.7,0.8] {0.8
    # right}, (0.8,0.9] {0.9 right}: (2*|0.5-0.575| + 0.3 + 0.2 + 0.1) / 5
    assert m["ece"] == pytest.approx((2 * 0.075 + 0.3 + 0.2 + 0.1) / 5)
    assert (tmp_path / "confusion_matrix.png").exists() and (tmp_path / "reliability.png").exists()


def test_threshold_is_the_loosest_that_meets_the_target_precision():
    labels = ["a", "b"]
    y = ["a", "a", "b", "b", "a"]
    # By confidence: 0.95 right, 0.9 right, 0.8 wrong, 0.7 right, 0.6 right.
    probs = np.array([[0.95, 0.05], [0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    assert choose_threshold(y, probs, labels, target_precision=0.75) == pytest.approx(0.6)
    assert choose_threshold(y, probs, labels, target_precision=0.97) == pytest.approx(0.9)
    # Nobody reaches it: accept nothing rather than accept at lower precision.
    wrong = np.array([[0.2, 0.8], [0.3, 0.7]])
    t = choose_threshold(["a", "a"], wrong, labels, target_precision=0.9)
    assert t > 0.8


def test_class_balanced_threshold_does_not_let_a_big_easy_class_hide_rare_mistakes():
    labels = ["a", "b"]
    y = ["a"] * 8 + ["b", "b"]
    # Eight easy "a" rows at 0.9; a wrong "b" (called "a") at 0.6, a right "b" at 0.51.
    probs = np.array([[0.9, 0.1]] * 8 + [[0.49, 0.51], [0.6, 0.4]])
    # Plain precision over all ten rows is 9/10 and meets 0.9: everything is accepted.
    assert choose_threshold(y, probs, labels, target_precision=0.9) == pytest.approx(0.51)
    # Weighted by class, the wrong "b" costs half of all "b" weight: stop above it.
    balanced = choose_threshold(y, probs, labels, target_precision=0.9, class_balanced=True)
    assert balanced == pytest.approx(0.9)


# --- labels at any depth ------------------------------------------------------------------------

PATHS = {
    "Cameras": ["Cameras > Mirrorless", "Cameras"],
    "Phones": ["Phones > Unlocked", "Phones > Prepaid"],
    "Washers": ["Washers"],
}


def with_paths(data: TrainingData) -> TrainingData:
    """The synthetic rows with paths of mixed depth under their top-level label."""
    paths = [PATHS[label][i % len(PATHS[label])] for i, label in enumerate(data.labels)]
    return dataclasses.replace(data, paths=paths)


def test_factored_linear_model_keeps_its_probabilities_and_its_graph():
    data = synthetic(n=90)
    vocab = fit_vocabulary(data.inputs.texts, LexicalParams(min_df=1))
    features = lexical_matrix(vocab, data.inputs.texts)
    y = np.array([LABELS.index(label) for label in data.labels])
    whole, _ = fit_linear(features, y, num_classes=3, c=10.0)
    # Centred over the classes, 3 classes' weights have rank 2: factoring loses nothing
    # but the two tables' half-precision rounding (TABLE_DTYPE), about 1e-4 here.
    factored, _ = fit_linear(features, y, num_classes=3, c=10.0, exact_rank=2)
    assert factored.coef.shape == (vocab.size, 2) and factored.proj.shape == (2, 3)
    np.testing.assert_allclose(
        factored.predict_proba(features), whole.predict_proba(features), atol=5e-4
    )
    mlp = build_model(ModelShape(num_classes=3, image_dim=IMAGE_DIM))
    mixed = build_ensemble(mlp, factored.coef, factored.bias, 0.7, factored.proj)
    feeds = fusion_inputs(vocab, data.inputs)
    expected = 0.7 * factored.predict_proba(features) + 0.3 * np.asarray(
        mlp.predict({k: feeds[k] for k in ("text_emb", "image_emb", "image_present")}, verbose=0)
    )
    np.testing.assert_allclose(mixed.predict(feeds, verbose=0), expected, atol=1e-5)
    assert check_parity(to_onnx(mixed), mixed, feeds) <= 1e-4


def test_training_on_paths_scores_the_tree_and_keeps_top_level_figures(tmp_path):
    data = with_paths(synthetic())
    params = TrainParams(
        epochs=2,
        batch_size=32,
        linear_exact_rank=4,  # below the 5 labels: the factored linear part is what serves
        linear_exact_rank_choices=(),
        lexical=dataclasses.replace(TrainParams().lexical, max_terms=2000),
        target_precision=0.6,
    )
    result = train(data, params, tmp_path)
    assert result.labels == sorted({p for ps in PATHS.values() for p in ps})
    model = FusionModel.from_artifact(result.artifact, result.sha256)
    assert model.tree.root_names == LABELS
    assert model.level_thresholds[0] == result.threshold and len(model.level_thresholds) == 2
    test = result.metrics["test"]
    # The flat keys keep their meaning: the top level.
    assert test["labels"] == LABELS and test["macro_f1"] > 0.9
    assert set(test["levels"]) == {"1", "2"} and 0 < test["hierarchical"]["f1"] <= 1
    assert set(test["backoff"]["levels"]) == {"1", "2"}
    assert result.metrics["baseline"]["macro_f1"] > 0.9


def test_only_the_path_part_reads_the_photo_term():
    data = with_paths(synthetic())
    params = TrainParams(
        epochs=1,
        batch_size=32,
        lexical=dataclasses.replace(TrainParams().lexical, max_terms=2000, photo_weight=0.5),
    )
    fitted = fit_model(data, split_for(data, params), params)
    top, paths = fitted.parts
    photo_row = fitted.vocabulary.photo_id
    assert fitted.vocabulary.terms[-1] == PHOTO_TERM
    # The top level was fitted on a cleared column and serves nothing for the term ...
    assert not top.model.get_layer("linear").get_weights()[0][photo_row].any()
    # ... while the paths learned from it (60% of the synthetic rows have a photo).
    assert paths.model.get_layer("linear").get_weights()[0][photo_row].any()
    assert reads_photo_term(data) and not reads_photo_term(dataclasses.replace(data, paths=None))
    assert lexical_of(fitted.vocabulary, data, False)[:, photo_row].nnz == 0
    photos = lexical_of(fitted.vocabulary, data, True)[:, photo_row].toarray().ravel()
    assert photos.tolist() == (0.5 * data.inputs.image_present).tolist()
    # Photos on (almost) every row, or on none: nothing for the term to tell.
    for present in (np.ones(len(data.labels)), np.zeros(len(data.labels))):
        inputs = dataclasses.replace(data.inputs, image_present=present.astype(np.float32))
        assert not reads_photo_term(dataclasses.replace(data, inputs=inputs))
    refitted = refit_linear(fitted, data)
    top, _ = refitted.parts
    assert not top.model.get_layer("linear").get_weights()[0][photo_row].any()


def test_the_path_part_takes_the_rank_whose_validation_key_is_largest():
    data = with_paths(synthetic())
    params = TrainParams(
        epochs=1,
        batch_size=32,
        linear_exact_rank=2,
        linear_exact_rank_choices=(3, 2, 4),
        lexical=dataclasses.replace(TrainParams().lexical, max_terms=2000),
    )
    split = split_for(data, params)
    top = fit_model(dataclasses.replace(data, paths=None), split, params)
    for keys, chosen in (([(1, 0.5), (2, 0.1), (2, 0.3)], 4), ([(2, 0.5), (2, 0.5), (1, 0.9)], 2)):
        seen = []

        def key(labels, probs, keys=keys, seen=seen):
            seen.append(probs)
            return keys[len(seen) - 1]

        fitted = _fit_one(data, split, params, rank_key=key)
        # The default first, each rank once; the chosen one's mix is what thresholds see.
        assert len(seen) == 3 and fitted.linear_exact_rank == chosen
        np.testing.assert_array_equal(fitted.val_probs, seen[[2, 3, 4].index(chosen)])
        table = fitted.model.get_layer("linear").weights[0]
        assert tuple(table.shape) == (fitted.vocabulary.size, chosen)
        # The served refit keeps it.
        refitted = refit_linear(fitted, data)
        assert tuple(refitted.model.get_layer("linear").weights[0].shape)[1] == chosen
    # Without a key (the top level, a flat model) nothing is chosen.
    assert top.linear_exact_rank == 2
    # fit_model gives the path part tree_key, and the top level the default.
    tree = fit_model(data, split, params)
    assert tree.parts[0].linear_exact_rank == 2 and tree.parts[1].linear_exact_rank in (2, 3, 4)


def test_tree_key_puts_an_accepted_deep_level_before_hf():
    labels = ["A", "A > x", "A > y", "B"]
    truth = ["A > x", "A > x", "A > y", "B"]
    params = TrainParams(target_precision=0.97, threshold_deep_z=0.0)
    deep = np.array(
        [
            [0.0, 0.9, 0.1, 0.0],  # right at both levels
            [0.0, 0.8, 0.1, 0.1],  # right
            [0.0, 0.35, 0.25, 0.4],  # A > x at 0.35: wrong at level 2, and unsure
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    # The surest level-2 answer wrong: no threshold there shows 0.97 precision.
    shallow = deep.copy()
    shallow[0] = [0.0, 0.05, 0.95, 0.0]
    shallow[2] = [0.0, 0.0, 0.6, 0.4]
    candidates = ["A > x", "A > x", "A > x", "B"]
    hf = hierarchical_metrics(truth, candidates)["hierarchical"]["f1"]
    assert tree_key(truth, deep, labels, params) == (2, pytest.approx(hf))
    shallow_key = tree_key(truth, shallow, labels, params)
    assert shallow_key[0] == 1 and shallow_key[1] == pytest.approx(hf)
    assert tree_key(truth, deep, labels, params) > shallow_key


def test_per_level_thresholds_on_a_flat_tree_are_the_flat_threshold():
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.ones(3) * 0.5, size=300)
    y = [LABELS[k] for k in rng.integers(0, 3, size=300)]
    for balanced in (False, True):
        flat = choose_threshold(y, probs, LABELS, 0.5, class_balanced=balanced)
        assert choose_level_thresholds(y, probs, LABELS, 0.5, class_balanced=balanced) == [flat]


def test_per_level_thresholds_judge_each_level_on_rows_whose_truth_reaches_it():
    labels = ["A", "A > x", "A > y", "B"]
    # Rows 0-2 truly under A at depth 2, row 3 labeled A only (says nothing about level 2).
    truth = ["A > x", "A > x", "A > y", "A"]
    probs = np.array(
        [
            [0.0, 0.9, 0.1, 0.0],  # A 1.0, A > x 0.9: right at both levels
            [0.0, 0.6, 0.3, 0.1],  # A 0.9, A > x 0.6: right
            [0.0, 0.55, 0.4, 0.05],  # A 0.95, A > x 0.55: wrong at level 2
            [0.1, 0.5, 0.3, 0.1],  # A 0.9, A > x 0.5: no truth at level 2
        ]
    )
    level1, level2 = choose_level_thresholds(truth, probs, labels, target_precision=0.97)
    assert level1 == pytest.approx(0.9)  # every root is right
    assert level2 == pytest.approx(0.6)  # the wrong 0.55 must stay out; row 3 is not counted


def test_surest_threshold_asks_a_lower_bound_of_the_target_not_the_point_estimate():
    # 40 right rows, one wrong, 20 right: 60 of 61 is 0.984 >= 0.97, but the Wilson bound
    # (z 1) of 61 rows with one error is 0.958; 40 right rows alone bound it at 0.976.
    confidence = np.linspace(0.99, 0.60, 61)
    correct = np.ones(61, dtype=bool)
    correct[40] = False
    assert loosest_threshold(confidence, correct, 0.97) == pytest.approx(confidence[60])
    assert surest_threshold(confidence, correct, 0.97, z=1.0) == pytest.approx(confidence[39])
    # 30 right rows bound precision at 0.968 only: not enough for 0.97.
    assert surest_threshold(confidence[:30], correct[:30], 0.97, z=1.0) > confidence[0]
    # z 0 is the point estimate: the same rows are accepted, ties included.
    rng = np.random.default_rng(5)
    conf = rng.random(200).round(2)
    right = rng.random(200) < conf
    for target in (0.6, 0.8, 0.9):
        surest = surest_threshold(conf, right, target, z=0.0)
        loosest = loosest_threshold(conf, right, target)
        assert np.array_equal(conf >= surest, conf >= loosest)


def test_deep_levels_can_ask_the_lower_bound_and_the_top_level_keeps_its_rule():
    labels = ["A", "A > x", "A > y", "B"]
    truth = ["A > x", "A > x", "A > y", "A"]
    probs = np.array(
        [[0.0, 0.9, 0.1, 0.0], [0.0, 0.6, 0.3, 0.1], [0.0, 0.55, 0.4, 0.05], [0.1, 0.5, 0.3, 0.1]]
    )
    point = choose_level_thresholds(truth, probs, labels, target_precision=0.97)
    bound = choose_level_thresholds(truth, probs, labels, target_precision=0.97, deep_z=1.0)
    assert bound[0] == point[0] == pytest.approx(0.9)
    # Two right rows at level 2 are the point estimate's 1.0, but no proof of 0.97.
    assert point[1] == pytest.approx(0.6) and bound[1] > 0.9


def test_balance_evens_out_paths_or_their_top_level_categories():
    labels = ["A", "A > x", "B"]
    y = np.array([0, 0, 0, 1, 2, 2])  # 3 x A, 1 x A > x, 2 x B
    # "path" (the default): every labeled path as the baseline weighs it, n / (K * count).
    assert class_weights(y, 3, "balanced", balanced_index(labels, "path")) == {
        0: pytest.approx(6 / 9), 1: pytest.approx(2.0), 2: pytest.approx(1.0)
    }  # fmt: skip
    # "root": balanced between the two roots (4 and 2 rows), each path at its root's
    # weight, so a rare path is not worth a whole category.
    assert class_weights(y, 3, "balanced", balanced_index(labels, "root")) == {
        0: pytest.approx(0.75), 1: pytest.approx(0.75), 2: pytest.approx(1.5)
    }  # fmt: skip
    assert TrainParams().balance == "path"
    with pytest.raises(ValueError, match="balance"):
        balanced_index(labels, "leaf")


@pytest.mark.parametrize(
    "params",
    [
        LexicalParams(min_df=1, max_row_terms=12),
        LexicalParams(analyzer="tfidf_union", min_df=1, name_weight=0.5, max_row_terms=20),
    ],
    ids=["words", "tfidf_union+names"],
)
def test_batch_transform_is_the_row_by_row_definition(params, fixture_data):
    """transform() works per batch and remembers words; each row must still be exactly
    analyze()'s terms, tf-idf weighted, cut to its top terms and normalized per block."""
    rows = list(csv.DictReader((fixture_data / "flipkart" / "products.csv").open()))[:60]
    names = [r["name"] for r in rows]
    texts = [f"{r['name']}. {r['description']}" for r in rows]
    vocab = fit_vocabulary(texts, params, names=names if params.name_weight else None)
    index = {t: i + 1 for i, t in enumerate(vocab.terms)}
    idf = np.asarray(vocab.idf, dtype=np.float32)

    def block(i: int) -> int:
        return 0 if params.analyzer == "words" else BLOCKS[vocab.terms[i - 1].split(":")[0]]

    def expected(text: str, name: str) -> dict[int, float]:
        terms = analyze(text, params, name if params.name_weight else None)
        counts = Counter(index[t] for t in terms if t in index)
        w = {i: (1 + np.log(np.float32(c))) * idf[i - 1] for i, c in counts.items()}
        top = sorted(w, key=lambda i: -w[i])[: params.max_row_terms]  # stable: first seen
        scale = (1.0, 1.0, params.name_weight, params.name_weight)
        norms = {b: np.sqrt(sum(float(w[i]) ** 2 for i in top if block(i) == b)) for b in range(4)}
        return {i: scale[block(i)] * float(w[i]) / norms[block(i)] for i in top}

    # Twice over, so the second pass reads every word's char n-grams from the memo.
    for _ in range(2):
        ids, weights = vocab.transform(texts, names)
        for r, (text, name) in enumerate(zip(texts, names, strict=True)):
            want = expected(text, name)
            got = {int(i): float(w) for i, w in zip(ids[r], weights[r], strict=True) if i}
            assert got.keys() == want.keys()
            np.testing.assert_allclose([got[i] for i in want], list(want.values()), rtol=1e-5)
