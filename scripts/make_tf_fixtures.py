"""Regenerate the small TensorFlow checkpoints under ``tests/fixtures/tf/`` (needs tensorflow).

The fixtures let CI test `weightbridge.io.tfcheckpoint` against bytes TensorFlow really wrote,
without installing TensorFlow. Three checkpoints, a few KB each:

* ``keras/``: ``tf.train.Checkpoint(model=...).save`` of a tiny Keras model with a bfloat16 and a
  float16 layer (object-graph keys ending in ``/.ATTRIBUTES/VARIABLE_VALUE``, the object graph
  string tensor, a ``checkpoint`` state file with a relative path);
* ``saver/``: ``tf.compat.v1.train.Saver`` in graph mode (plain variable names, one variable per
  common dtype, a ``checkpoint`` state file with the *absolute* path TF1 writes, which does not
  exist on the reading machine);
* ``sharded/``: ``tf.train.Checkpoint.write`` with a shard-size policy, so tensors spread over
  several ``.data-0000x-of-0000N`` files; no state file.

Beside each, ``<name>.json`` (a weightbridge spec: our name -> shape, dtype, TensorFlow's key) and
``<name>.npz`` (each tensor's raw little-endian bytes as uint8, so bfloat16 survives ``np.savez``)
hold what ``tf.train.load_checkpoint(...).get_tensor(key)`` returns: the oracle the tests
compare against bit for bit.

    python scripts/make_tf_fixtures.py            # writes tests/fixtures/tf/
    python scripts/make_tf_fixtures.py --out /tmp/tf-fixtures
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TF's start-up chatter is not output

import numpy as np

from weightbridge import dtypes

VARIABLE_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
# Where the Saver checkpoint is first written: its absolute path lands in the state file, and a
# fixed one keeps regenerated fixtures byte-identical.
SAVER_WORKDIR = os.path.join(tempfile.gettempdir(), "weightbridge-tf-fixtures")
# Small enough that the sharded checkpoint's tensors spread over several data files, and no
# smaller than its largest tensor (24 bytes): the policy slices a bigger tensor into pieces,
# which is a partitioned variable (and a tiny max on a big tensor makes millions of them).
MAX_SHARD_BYTES = 24


def record_oracle(prefix: str, out_base: str) -> None:
    """Write ``out_base.json`` and ``out_base.npz`` from what TensorFlow itself reads back."""
    import tensorflow as tf

    reader = tf.train.load_checkpoint(prefix)
    spec: dict[str, dict[str, object]] = {}
    raw: dict[str, np.ndarray] = {}
    for key, tf_dtype in sorted(reader.get_variable_to_dtype_map().items()):
        if tf_dtype == tf.string:  # the object graph: not a tensor
            continue
        value = np.asarray(reader.get_tensor(key))  # not ascontiguousarray: it makes 0-d 1-d
        name = key[: -len(VARIABLE_SUFFIX)] if key.endswith(VARIABLE_SUFFIX) else key
        spec[name] = {
            "shape": list(value.shape),
            "dtype": dtypes.canonical(tf_dtype.name),
            "tf_key": key,
        }
        raw[name] = np.frombuffer(value.tobytes(), dtype=np.uint8)
    with open(out_base + ".json", "w", encoding="utf-8") as f:
        json.dump(spec, f, indent=1, sort_keys=True)
        f.write("\n")
    np.savez(out_base + ".npz", **raw)


def make_keras(out: str) -> str:
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(3, dtype="bfloat16", name="proj"),
            keras.layers.Dense(2, dtype="float16", name="head"),
        ]
    )
    # Non-zero biases, so a reader that reads the wrong bytes cannot pass by reading zeros.
    for layer in model.layers:
        layer.bias.assign(np.linspace(-1, 1, layer.bias.shape[0]).astype(layer.bias.dtype))
    path: str = tf.train.Checkpoint(model=model).save(os.path.join(out, "keras", "ckpt"))
    return path


def make_saver(out: str) -> str:
    import tensorflow as tf

    rng = np.random.default_rng(1)
    values = {
        "dense/kernel": rng.standard_normal((4, 3)).astype(np.float32),
        "dense/bias": np.array([0.5, -0.25, 2.0], dtype=np.float16),
        "embed/table": rng.standard_normal((5, 2)).astype(np.float64),
        "global_step": np.array(1234, dtype=np.int64),
        "counts": np.array([1, -2, 3], dtype=np.int32),
        "mask": np.array([True, False, True, True]),
        "pixels": np.array([[0, 255], [7, 128]], dtype=np.uint8),
    }
    workdir = os.path.join(SAVER_WORKDIR, "saver")
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir)
    with tf.Graph().as_default():
        variables = [
            tf.compat.v1.get_variable(name, initializer=tf.constant(value), use_resource=False)
            for name, value in values.items()
        ]
        saver = tf.compat.v1.train.Saver(variables)
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            saver.save(sess, os.path.join(workdir, "model.ckpt"), write_meta_graph=False)
    dest = os.path.join(out, "saver")
    shutil.copytree(workdir, dest)
    shutil.rmtree(SAVER_WORKDIR, ignore_errors=True)
    return os.path.join(dest, "model.ckpt")


def make_sharded(out: str) -> str:
    import tensorflow as tf

    rng = np.random.default_rng(2)
    module = tf.Module()
    module.a = tf.Variable(rng.standard_normal((2, 3)).astype(np.float32))
    module.b = tf.Variable(np.arange(6, dtype=np.int16).reshape(3, 2))
    module.c = tf.Variable(rng.standard_normal(5).astype(np.float32), dtype=tf.bfloat16)
    module.d = tf.Variable(rng.standard_normal((3, 3)).astype(np.float16))
    policy = tf.train.experimental.MaxShardSizePolicy(max_shard_size=MAX_SHARD_BYTES)
    options = tf.train.CheckpointOptions(experimental_sharding_callback=policy)
    prefix = os.path.join(out, "sharded", "ckpt")
    written: str = tf.train.Checkpoint(module=module).write(prefix, options=options)
    return written


def main() -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(root, "tests", "fixtures", "tf"))
    args = parser.parse_args()
    out = os.path.abspath(args.out)
    for name in ("keras", "saver", "sharded"):
        shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    os.makedirs(out, exist_ok=True)
    for name, make in (("keras", make_keras), ("saver", make_saver), ("sharded", make_sharded)):
        prefix = make(out)
        record_oracle(prefix, os.path.join(out, name))
        files = sorted(os.listdir(os.path.dirname(prefix)))
        size = sum(os.path.getsize(os.path.join(os.path.dirname(prefix), f)) for f in files)
        print(f"{name}: {prefix} ({len(files)} files, {size} bytes)")


if __name__ == "__main__":
    main()
