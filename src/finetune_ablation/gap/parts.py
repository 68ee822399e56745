"""The parts of a model the gap measurement switches on and off, found by walking its graph.

Most image classifiers people fine-tune are one chain: the course's ``alpaca_model``, TF's
transfer-learning tutorial and the suite's own classifier all read

    input -> augmentation -> preprocessing -> base -> pooling -> dropout -> logits

``Parts.of(model)`` cuts a functional (or ``Sequential``) model's top-level graph into four stages, each a
``Segment`` of the model's own nodes, replayed with the same layer objects and arguments:

- ``augment``: the leading random preprocessing (Keras's ``RandomFlip``, ``RandomRotation``, ..., alone or
  in a nested ``Sequential``), with whatever weightless preprocessing comes before it;
- ``pre`` -> ``base`` -> ``post``: the body, from the augmented images to the head's input. ``base`` is the
  nested model where a frozen bottom can be cut (``passes.FrozenBottom``): the one nested model with
  weights, or, without one, the body itself as a model of its own;
- ``head``: from the first dropout layer after the last BatchNormalization (and after the last nested
  model) to the output; empty when there is no such dropout.

A stage boundary is a single tensor every path from input to output crosses. Where the graph has no such
cut, or augmentation layers sit anywhere but in front, ``Parts.of`` says why (``NotStaged``). See
docs/gap-measurement.md."""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass, field

import keras

from .layers import augmentation_layers, batchnorm_layers, is_augmentation, is_dropout, seed_states, walk_layers


class NotStaged(Exception):
    """The model cannot be cut into stages; the message says why."""


def _takes_training(operation) -> bool:
    call = getattr(operation, "call", None)
    try:
        return call is not None and "training" in inspect.signature(call).parameters
    except (TypeError, ValueError):
        return False


@dataclass(eq=False)
class Segment:
    """Consecutive nodes of a model's graph, from one tensor to another, replayed as the functional model
    runs them: each node's own arguments, with ``training`` given to every layer that takes it (as a
    functional model hands its own ``training`` down in Keras 3 up to 3.15)."""

    nodes: list
    source: object  # the KerasTensor the segment starts from
    target: object  # the KerasTensor it ends at

    def __call__(self, x, training: bool):
        values = {id(self.source): x}
        for node in self.nodes:
            args, kwargs = node.arguments.fill_in(values)
            if _takes_training(node.operation):
                kwargs = {**kwargs, "training": training}
            outputs = node.operation(*args, **kwargs)
            for symbolic, value in zip(node.outputs, keras.tree.flatten(outputs), strict=True):
                values[id(symbolic)] = value
        return values[id(self.target)]

    @property
    def operations(self) -> list:
        return [node.operation for node in self.nodes]

    def layers(self) -> list[keras.layers.Layer]:
        """The segment's layers and everything inside them."""
        out = []
        for op in self.operations:
            if isinstance(op, keras.layers.Layer):
                out.append(op)
                out.extend(walk_layers(op))
        return out


def _graph(model: keras.Model):
    """The functional graph of ``model`` (a Sequential keeps one inside once built), or None."""
    graph = getattr(model, "_functional", None) if isinstance(model, keras.Sequential) else model
    if graph is None or not hasattr(graph, "_nodes_by_depth"):
        return None
    return graph


def ordered_nodes(graph) -> list:
    """The graph's calls in the order the model runs them, inputs left out."""
    by_depth = graph._nodes_by_depth
    return [node for depth in sorted(by_depth, reverse=True) for node in by_depth[depth] if not node.is_input]


def _crossing(nodes: list, k: int, graph) -> list:
    """Tensors made before position ``k`` (or the model's input) and read at or after it (or output)."""
    before = {id(t) for t in graph.inputs}
    for node in nodes[:k]:
        before.update(id(t) for t in node.outputs)
    found: dict[int, object] = {}
    for node in nodes[k:]:
        for t in node.input_tensors:
            if id(t) in before:
                found[id(t)] = t
    for t in graph.outputs:
        if id(t) in before:
            found[id(t)] = t
    return list(found.values())


def _weightless_preprocessing(op) -> bool:
    """No weights, no BatchNorm, no dropout: an op such as ``preprocess_input``'s arithmetic, Rescaling,
    a random augmentation layer or a block of them."""
    if not isinstance(op, keras.layers.Layer):
        return True
    parts = [op, *walk_layers(op)]
    return not op.weights and not any(is_dropout(p) or isinstance(p, keras.layers.BatchNormalization) for p in parts)


def _head_like(op) -> bool:
    """Pooling, flattening, dropout, dense, activations: nothing that normalises, augments or nests."""
    if not isinstance(op, keras.layers.Layer):
        return True
    return not isinstance(op, keras.Model) and not is_augmentation(op) and not batchnorm_layers(op)


@dataclass(eq=False)
class Parts:
    """A model cut into stages (see the module docstring); ``features`` is the body's pass."""

    model: keras.Model
    augment: Segment | None
    pre: Segment | None
    base: keras.Model | None
    post: Segment | None
    head: Segment | None
    feature_shape: tuple[int, ...]
    feature_dtype: str
    _measuring_passes: object | None = field(default=None, repr=False)

    @classmethod
    def of(cls, model: keras.Model) -> Parts:
        """The stages of ``model`` (cached per model object); raises ``NotStaged`` saying why not."""
        found = _FOUND.get(model)
        if found is None:
            found = _find(model)
            _FOUND[model] = found
        if isinstance(found, NotStaged):
            raise found
        return found

    @property
    def augments(self) -> bool:
        """Whether the augmentation stage changes images at all."""
        return bool(self.augment and any(is_augmentation(layer) for layer in self.augment.layers()))

    @property
    def body_layers(self) -> list[keras.layers.Layer]:
        layers = [*(self.pre.layers() if self.pre else [])]
        if self.base is not None:
            layers += [self.base, *walk_layers(self.base)]
        return layers + (self.post.layers() if self.post else [])

    @property
    def body_batchnorms(self) -> list[keras.layers.BatchNormalization]:
        return [layer for layer in self.body_layers if isinstance(layer, keras.layers.BatchNormalization)]

    @property
    def body_is_stochastic(self) -> bool:
        """Whether the body draws dropout or noise in training mode (e.g. stochastic depth)."""
        return any(is_dropout(layer) for layer in self.body_layers)

    @property
    def body_is_fixed(self) -> bool:
        """A frozen body without random layers maps an image to the same features all phase."""
        return not any(layer.trainable_weights for layer in self.body_layers) and not self.body_is_stochastic

    def augment_seed_states(self) -> list:
        return [v for layer in self.augment.operations for v in seed_states(layer)] if self.augment else []

    def head_seed_states(self) -> list:
        return [v for layer in self.head.operations for v in seed_states(layer)] if self.head else []

    def body_seed_states(self) -> list:
        ops = [*(self.pre.operations if self.pre else []), self.base, *(self.post.operations if self.post else [])]
        return [v for op in ops if isinstance(op, keras.layers.Layer) for v in seed_states(op)]

    def preprocess(self, x, training: bool = False):
        return self.pre(x, training) if self.pre else x

    def postprocess(self, x, training: bool = False):
        return self.post(x, training) if self.post else x

    def features(self, x, training: bool):
        """augmented images -> the head's input: pre -> base -> post."""
        x = self.preprocess(x, training)
        if self.base is not None:
            x = self.base(x, training=training)
        return self.postprocess(x, training)

    def head_pass(self, f, training: bool):
        return self.head(f, training) if self.head else f


_FOUND: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _find(model: keras.Model) -> Parts | NotStaged:
    graph = _graph(model)
    if graph is None:
        return NotStaged(f"{model.name} is not a functional or built Sequential model")
    if len(graph.inputs) != 1 or len(graph.outputs) != 1:
        return NotStaged(f"{model.name} has {len(graph.inputs)} inputs and {len(graph.outputs)} outputs, not one each")
    nodes = ordered_nodes(graph)
    cuts = [len(_crossing(nodes, k, graph)) == 1 for k in range(len(nodes) + 1)]

    def tensor_at(k: int):
        return _crossing(nodes, k, graph)[0]

    # augmentation: the longest weightless prefix that ends with an augmentation layer or block
    a_end = 0
    for k, node in enumerate(nodes, start=1):
        op = node.operation
        if not _weightless_preprocessing(op):
            break
        if cuts[k] and (is_augmentation(op) or isinstance(op, keras.Model)):
            a_end = k
    augment_ops = {id(layer) for node in nodes[:a_end] for layer in [node.operation, *walk_layers(node.operation)]}
    stray = [layer for layer in augmentation_layers(model) if id(layer) not in augment_ops]
    if stray:
        return NotStaged(f"augmentation layer {stray[0].name} is not in front of the layers with weights")
    # head: from the first dropout of the trailing run of head-like nodes
    h = len(nodes)
    for k in range(len(nodes) - 1, a_end - 1, -1):
        if not _head_like(nodes[k].operation):
            break
        if cuts[k] and is_dropout(nodes[k].operation):
            h = k
    body = nodes[a_end:h]
    nested = [i for i, node in enumerate(body, start=a_end) if isinstance(node.operation, keras.Model)]
    nested = [i for i in nested if nodes[i].operation.weights]
    source, target = tensor_at(a_end), tensor_at(h)
    if len(nested) == 1 and cuts[nested[0]] and cuts[nested[0] + 1]:
        i = nested[0]
        base = nodes[i].operation
        pre = Segment(nodes[a_end:i], source, tensor_at(i)) if i > a_end else None
        post = Segment(nodes[i + 1 : h], tensor_at(i + 1), target) if h > i + 1 else None
    elif body:
        base = keras.Model(source, target, name=f"{model.name}_body")
        pre, post = None, None
    else:
        base, pre, post = None, None, None
    augment = Segment(nodes[:a_end], tensor_at(0), source) if a_end else None
    head = Segment(nodes[h:], target, tensor_at(len(nodes))) if h < len(nodes) else None
    return Parts(model, augment, pre, base, post, head, tuple(target.shape[1:]), str(target.dtype))
