"""The course's exercise code, as a plain Keras script: the baseline the suite's own run is timed against.

    python benchmarks/plain_keras.py DATA_DIR [--image-size 160] [--batch-size 32] [--epochs 5 5]

Same data pipeline (``image_dataset_from_directory`` + prefetch), same model (augmentation ->
preprocess_input -> MobileNetV2 called with training=False -> pooling -> dropout -> one logit), same two
phases and learning rates. Three deviations, none of which changes the work done: ``weights=None``
(no network here), accuracy thresholded at logit 0 (the course's ``"accuracy"`` thresholds logits at
0.5), and phase 2 runs exactly ``fine_tune_epochs`` (the course's ``initial_epoch=history.epoch[-1]``
repeats one epoch). Prints the phases' wall times and each epoch's end (seconds since the first compile)
as JSON, and with ``--memory`` the resident memory (MiB) at the end of every phase-2 epoch: the baseline
for the suite's own (benchmarks/memory_per_epoch.py)."""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf
import tensorflow.keras.layers as tfl
from resident import EpochEnds, ResidentPerEpoch
from tensorflow.keras.preprocessing import image_dataset_from_directory


def data_augmenter() -> tf.keras.Sequential:
    data_augmentation = tf.keras.Sequential()
    data_augmentation.add(tfl.RandomFlip("horizontal"))
    data_augmentation.add(tfl.RandomRotation(0.2))
    return data_augmentation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory")
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, nargs=2, default=(5, 5), metavar=("INITIAL", "FINE_TUNE"))
    parser.add_argument("--fine-tune-at", type=int, default=120)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--memory", action="store_true", help="also print RSS at the end of each phase-2 epoch")
    args = parser.parse_args()
    tf.keras.utils.set_random_seed(args.seed)
    tf.config.experimental.enable_op_determinism()

    image_size = (args.image_size, args.image_size)
    train_dataset, validation_dataset = (
        image_dataset_from_directory(
            args.directory,
            shuffle=True,
            batch_size=args.batch_size,
            image_size=image_size,
            validation_split=0.2,
            subset=subset,
            seed=args.seed,
            verbose=False,
        )
        for subset in ("training", "validation")
    )
    train_dataset = train_dataset.prefetch(buffer_size=tf.data.AUTOTUNE)

    input_shape = (*image_size, 3)
    base_model = tf.keras.applications.MobileNetV2(input_shape=input_shape, include_top=False, weights=None)
    base_model.trainable = False
    inputs = tf.keras.Input(shape=input_shape)
    x = data_augmenter()(inputs)
    x = tf.keras.applications.mobilenet_v2.preprocess_input(x)
    x = base_model(x, training=False)
    x = tfl.GlobalAveragePooling2D()(x)
    x = tfl.Dropout(0.2)(x)
    outputs = tfl.Dense(1)(x)
    model = tf.keras.Model(inputs, outputs)

    base_learning_rate = 0.001
    loss = tf.keras.losses.BinaryCrossentropy(from_logits=True)
    accuracy = tf.keras.metrics.BinaryAccuracy(threshold=0.0, name="accuracy")
    started = time.perf_counter()
    epoch_ends = EpochEnds(started)
    model.compile(optimizer=tf.keras.optimizers.Adam(base_learning_rate), loss=loss, metrics=[accuracy])
    initial_epochs, fine_tune_epochs = args.epochs
    model.fit(
        train_dataset, validation_data=validation_dataset, epochs=initial_epochs, verbose=0, callbacks=[epoch_ends]
    )
    phase1 = time.perf_counter() - started

    resident = ResidentPerEpoch()
    started = time.perf_counter()
    base_model.trainable = True
    for layer in base_model.layers[: args.fine_tune_at]:
        layer.trainable = False
    optimizer = tf.keras.optimizers.Adam(learning_rate=0.1 * base_learning_rate)
    model.compile(loss=loss, optimizer=optimizer, metrics=[accuracy])
    model.fit(
        train_dataset,
        epochs=initial_epochs + fine_tune_epochs,
        initial_epoch=initial_epochs,
        validation_data=validation_dataset,
        verbose=0,
        callbacks=[epoch_ends, *([resident] if args.memory else [])],
    )
    phase2 = time.perf_counter() - started
    memory = {"phase2_epoch_end_mib": resident.sizes} if args.memory else {}
    ends = {"epoch_end_seconds": epoch_ends.seconds, "epoch_end_cpu_seconds": epoch_ends.cpu_seconds}
    print(json.dumps({"phase1_seconds": phase1, "phase2_seconds": phase2, **ends, **memory}))


if __name__ == "__main__":
    main()
