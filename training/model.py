"""The Keras fusion classifier: text, image and lexical branches joined by an MLP head.

``build_model`` returns a functional model whose inputs are, by name:

- ``text_emb`` (n, 384): the sentence embedding of the packed product text;
- ``image_emb`` (n, D): pooled image features, zeros where there is no image;
- ``image_present`` (n, 1): 1.0 where ``image_emb`` is real, else 0.0;
- ``lex_ids`` / ``lex_weights`` (n, L): the TF-IDF bag from ``worker.lexical``
  (only when ``lexical_vocab_size`` > 0; L varies per batch).

and whose single output ``probs`` is softmax over K classes. Branches follow DESIGN.md:
text 384->256->128, image D->512->256, each layer Dense+BatchNorm+Dropout, concatenated
(with the image-present flag) into 256->128->softmax(K). The lexical branch is an
embedding bag (equivalent to a Dense layer over the sparse TF-IDF vector) to 256.

Modality dropout hides the image of a random share of training rows (embedding and flag
together) so the model learns to classify from text alone; it is the identity at
inference and so vanishes from the exported graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
from keras import layers, ops

TEXT_DIM = 384


@dataclass(frozen=True)
class ModelShape:
    """What the graph needs to know about its inputs and outputs."""

    num_classes: int
    image_dim: int
    text_dim: int = TEXT_DIM
    lexical_vocab_size: int = 0
    lexical_units: int = 128
    # A linear TF-IDF -> logits path added before the softmax ("wide and deep"): the
    # capacity of the logistic-regression baseline, inside the same graph.
    lexical_wide: bool = True
    dropout: float = 0.3
    modality_dropout: float = 0.3


class ModalityDropout(layers.Layer):
    """In training, zero the image embedding and its present flag for a share of rows."""

    def __init__(self, rate: float, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.rate = rate
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs, training=None):
        image_emb, present = inputs
        if not training or self.rate <= 0:
            return image_emb, present
        keep = ops.cast(
            keras.random.uniform(ops.shape(present), seed=self.seed_generator) >= self.rate,
            present.dtype,
        )
        return image_emb * keep, present * keep

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "rate": self.rate}


def _dense_block(x, units: int, dropout: float, name: str):
    x = layers.Dense(units, name=f"{name}_dense")(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    x = layers.Activation("relu", name=f"{name}_relu")(x)
    return layers.Dropout(dropout, name=f"{name}_dropout")(x)


def build_model(shape: ModelShape, seed: int = 0) -> keras.Model:
    """A fresh, uncompiled fusion model (see the module docstring for inputs)."""
    text_in = keras.Input((shape.text_dim,), name="text_emb")
    image_in = keras.Input((shape.image_dim,), name="image_emb")
    present_in = keras.Input((1,), name="image_present")
    inputs = [text_in, image_in, present_in]

    image, present = ModalityDropout(shape.modality_dropout, seed=seed, name="modality_dropout")(
        [image_in, present_in]
    )
    # Multiplying by the flag guarantees a missing image contributes exactly nothing,
    # whatever the caller put in image_emb for that row.
    image = layers.Multiply(name="image_mask")([image, present])

    t = _dense_block(text_in, 256, shape.dropout, "text1")
    t = _dense_block(t, 128, shape.dropout, "text2")
    i = _dense_block(image, 512, shape.dropout, "image1")
    i = _dense_block(i, 256, shape.dropout, "image2")
    parts = [t, i, present]

    if shape.lexical_vocab_size > 0:
        ids_in = keras.Input((None,), dtype="int64", name="lex_ids")
        weights_in = keras.Input((None,), name="lex_weights")
        inputs += [ids_in, weights_in]
        if shape.lexical_units > 0:
            table = layers.Embedding(
                shape.lexical_vocab_size, shape.lexical_units, name="lex_embedding"
            )(ids_in)
            # Weighted sum over the bag == Dense over the sparse TF-IDF vector (no
            # bias); padding has weight 0 and so drops out.
            bag = ops.sum(table * ops.expand_dims(weights_in, -1), axis=1)
            lex = layers.BatchNormalization(name="lex_bn")(bag)
            lex = layers.Activation("relu", name="lex_relu")(lex)
            parts.append(layers.Dropout(shape.dropout, name="lex_dropout")(lex))
        if shape.lexical_wide:
            wide_table = layers.Embedding(
                shape.lexical_vocab_size, shape.num_classes, name="lex_wide_embedding"
            )(ids_in)
            wide = ops.sum(wide_table * ops.expand_dims(weights_in, -1), axis=1)

    x = layers.Concatenate(name="fusion")(parts)
    x = _dense_block(x, 256, shape.dropout, "head1")
    x = _dense_block(x, 128, shape.dropout, "head2")
    logits = layers.Dense(shape.num_classes, name="logits")(x)
    if shape.lexical_vocab_size > 0 and shape.lexical_wide:
        logits = layers.Add(name="wide_and_deep")([logits, wide])
    probs = layers.Activation("softmax", name="probs")(logits)
    return keras.Model(inputs=inputs, outputs=probs, name="shelver_fusion")


class LinearBag(layers.Layer):
    """Softmax regression over the TF-IDF bag: softmax(sum_j w_j * table[id_j] @ proj + bias).

    Holds a logistic regression fitted outside Keras (``training.fit.fit_linear``); its
    weights are fixed, so in the graph it is a Gather, a weighted sum and a softmax.
    The table is float16 (``training.fit.TABLE_DTYPE``, as the fit rounds it), read back
    as float32 row by row: it is most of the artifact and of a worker's model memory.
    With ``rank`` the (vocabulary x classes) weights are factored into a (vocabulary x
    rank) table and a (rank x classes) projection, so the artifact grows with the
    vocabulary, not with vocabulary x classes; without it there is no projection.
    """

    def __init__(self, vocab_size: int, num_classes: int, rank: int | None = None, **kwargs):
        super().__init__(trainable=False, **kwargs)
        self.vocab_size = vocab_size
        self.num_classes = num_classes
        self.rank = rank

    def build(self, input_shape):
        self.table = self.add_weight(
            shape=(self.vocab_size, self.rank or self.num_classes), initializer="zeros",
            trainable=False, name="table", dtype="float16",
        )  # fmt: skip
        if self.rank:
            self.proj = self.add_weight(
                shape=(self.rank, self.num_classes), initializer="zeros", trainable=False,
                name="proj",
            )  # fmt: skip
        self.bias = self.add_weight(
            shape=(self.num_classes,), initializer="zeros", trainable=False, name="bias"
        )

    def call(self, inputs):
        ids, weights = inputs
        rows = ops.cast(ops.take(self.table, ids, axis=0), "float32")
        bag = ops.sum(rows * ops.expand_dims(weights, -1), axis=1)
        if self.rank:
            bag = ops.matmul(bag, self.proj)
        return ops.softmax(bag + self.bias)

    def compute_output_shape(self, input_shape):
        return (input_shape[0][0], self.num_classes)

    def get_config(self):
        return {
            **super().get_config(),
            "vocab_size": self.vocab_size,
            "num_classes": self.num_classes,
            "rank": self.rank,
        }


def build_ensemble(mlp: keras.Model, coef, bias, linear_weight: float, proj=None) -> keras.Model:
    """``linear_weight`` x the linear model's probabilities + the rest x ``mlp``'s.

    ``coef`` (vocab size, K) and ``bias`` (K,) are the logistic regression over the
    lexical bag; or ``coef`` (vocab size, r) and ``proj`` (r, K) its factors. The
    result has the fusion graph's named inputs (``lex_ids`` and ``lex_weights``
    always) and one output, so it is served and exported like ``mlp``.
    """
    named = {t.name: t for t in mlp.inputs}
    inputs = {
        name: keras.Input(tuple(named[name].shape[1:]), dtype=named[name].dtype, name=name)
        for name in named
    }
    for name, dtype in (("lex_ids", "int64"), ("lex_weights", "float32")):
        inputs.setdefault(name, keras.Input((None,), dtype=dtype, name=name))
    mlp_probs = mlp([inputs[t.name] for t in mlp.inputs])
    if proj is None:
        linear = LinearBag(coef.shape[0], coef.shape[1], name="linear")
        weights = [coef, bias]
    else:
        linear = LinearBag(coef.shape[0], proj.shape[1], rank=proj.shape[0], name="linear")
        weights = [coef, proj, bias]
    linear_probs = linear([inputs["lex_ids"], inputs["lex_weights"]])
    linear.set_weights(weights)
    probs = layers.Add(name="probs")(
        [
            layers.Rescaling(float(linear_weight), name="linear_share")(linear_probs),
            layers.Rescaling(1.0 - float(linear_weight), name="mlp_share")(mlp_probs),
        ]
    )
    return keras.Model(inputs=list(inputs.values()), outputs=probs, name="shelver_ensemble")


class TreeShare(layers.Layer):
    """``paths * (top / (paths @ membership)) @ membership.T`` with fixed ``membership``."""

    def __init__(self, num_paths: int, num_roots: int, epsilon: float = 1e-12, **kwargs):
        super().__init__(trainable=False, **kwargs)
        self.num_paths = num_paths
        self.num_roots = num_roots
        self.epsilon = epsilon

    def build(self, input_shape):
        self.membership = self.add_weight(
            shape=(self.num_paths, self.num_roots), initializer="zeros", trainable=False,
            name="membership",
        )  # fmt: skip

    def call(self, inputs):
        top, paths = inputs
        root_of_paths = ops.maximum(ops.matmul(paths, self.membership), self.epsilon)
        return paths * ops.matmul(top / root_of_paths, ops.transpose(self.membership))

    def compute_output_shape(self, input_shape):
        return input_shape[1]

    def get_config(self):
        return {**super().get_config(), "num_paths": self.num_paths,
                "num_roots": self.num_roots, "epsilon": self.epsilon}  # fmt: skip


def build_tree_model(top: keras.Model, paths: keras.Model, membership) -> keras.Model:
    """The flat model's root probabilities shared among the paths under each root.

    ``top`` outputs (n, R) over top-level categories, ``paths`` (n, K) over category
    paths, ``membership`` (K, R) says which root each path lies under. Each path keeps
    its share of its root as ``paths`` sees it, and each root's total is ``top``'s
    (``TreeShare``). Inputs are the union of both models' named inputs.
    """
    # Fresh names: both parts are built by the same function and would share one.
    top = keras.Model(top.inputs, top.outputs[0], name="top_level")
    paths = keras.Model(paths.inputs, paths.outputs[0], name="paths")
    named = {t.name: t for m in (top, paths) for t in m.inputs}
    inputs = {
        name: keras.Input(tuple(t.shape[1:]), dtype=t.dtype, name=name) for name, t in named.items()
    }
    share = TreeShare(membership.shape[0], membership.shape[1], name="tree_share")
    probs = share(
        [top([inputs[t.name] for t in top.inputs]), paths([inputs[t.name] for t in paths.inputs])]
    )
    share.set_weights([membership])
    return keras.Model(inputs=list(inputs.values()), outputs=probs, name="shelver_tree")
